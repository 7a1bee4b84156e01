#include "gateway/metrics.hpp"

#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <sstream>

#ifndef INFERGATE_VERSION
#define INFERGATE_VERSION "0.0.0"
#endif

namespace infergate::gateway {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

std::vector<ClientMetric::Label> backend_labels(const discovery::Backend& b) {
  const auto& info = b.info();
  return {{"backend", info.id}, {"node", info.node}, {"slot", std::to_string(info.slot)}};
}

ClientMetric value_metric(std::vector<ClientMetric::Label> labels, double value, MetricType type) {
  ClientMetric m;
  m.label = std::move(labels);
  if (type == MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  return m;
}

ClientMetric histogram_metric(std::vector<ClientMetric::Label> labels,
                              const discovery::DurationHistogram& h) {
  ClientMetric m;
  m.label = std::move(labels);
  auto cumulative = h.cumulative();
  const auto& bounds = discovery::DurationHistogram::kBounds;
  for (std::size_t i = 0; i < cumulative.size(); ++i) {
    ClientMetric::Bucket bucket;
    bucket.cumulative_count = cumulative[i];
    bucket.upper_bound = i < bounds.size() ? bounds[i] : std::numeric_limits<double>::infinity();
    m.histogram.bucket.push_back(bucket);
  }
  m.histogram.sample_count = cumulative.back();
  m.histogram.sample_sum = h.sum_seconds();
  return m;
}

}  // namespace

std::string render_metrics(const GatewayState& state) {
  auto set = state.registry.snapshot();
  std::vector<MetricFamily> families;

  auto up = family("infergate_backend_up", "1 when the backend receives traffic (healthy), else 0", MetricType::Gauge);
  auto states = family("infergate_backend_state", "Backend state, one-hot", MetricType::Gauge);
  auto inflight = family("infergate_backend_inflight", "Requests in flight to the backend", MetricType::Gauge);
  auto requests = family("infergate_backend_requests_total", "Attempts on the backend by outcome: status class, or error (no or broken response); attempts whose client went away first are not counted", MetricType::Counter);
  auto duration = family("infergate_backend_request_duration_seconds", "Time from the start of the attempt on this backend to the end of the response", MetricType::Histogram);
  auto ttft = family("infergate_backend_ttft_seconds", "Time from the start of the attempt on this backend to the first body byte of a streamed response", MetricType::Histogram);
  auto retries = family("infergate_backend_retries_total", "Failed attempts on the backend that were retried on another", MetricType::Counter);
  auto ejections = family("infergate_backend_ejections_total", "Passive ejections after consecutive failures", MetricType::Counter);
  auto resends = family("infergate_backend_resends_total",
                        "Requests sent again on a new connection because the parked connection they went out on was "
                        "being closed by the backend (an idle close); the backend may have read the first copy",
                        MetricType::Counter);
  auto tokens = family("infergate_backend_tokens_total", "Tokens reported in responses' usage", MetricType::Counter);
  auto probes = family("infergate_health_probe_duration_seconds", "Active health probe latency", MetricType::Histogram);

  for (const auto& b : set->all) {
    const auto labels = backend_labels(*b);
    const auto state_now = b->state();
    up.metric.push_back(value_metric(labels, state_now == discovery::BackendState::kHealthy ? 1 : 0, MetricType::Gauge));
    for (std::size_t i = 0; i < discovery::kBackendStateCount; ++i) {
      auto s = static_cast<discovery::BackendState>(i);
      auto l = labels;
      l.push_back({"state", std::string(discovery::to_string(s))});
      states.metric.push_back(value_metric(std::move(l), s == state_now ? 1 : 0, MetricType::Gauge));
    }
    const auto& st = b->stats;
    inflight.metric.push_back(value_metric(labels, static_cast<double>(st.inflight.load()), MetricType::Gauge));
    const std::pair<const char*, std::uint64_t> by_code[] = {
        {"2xx", st.responses_2xx.load()}, {"4xx", st.responses_4xx.load()},
        {"5xx", st.responses_5xx.load()}, {"error", st.errors.load()}};
    for (const auto& [code, n] : by_code) {
      auto l = labels;
      l.push_back({"code", code});
      requests.metric.push_back(value_metric(std::move(l), static_cast<double>(n), MetricType::Counter));
    }
    duration.metric.push_back(histogram_metric(labels, st.duration));
    ttft.metric.push_back(histogram_metric(labels, st.ttft));
    retries.metric.push_back(value_metric(labels, static_cast<double>(st.retries.load()), MetricType::Counter));
    ejections.metric.push_back(value_metric(labels, static_cast<double>(st.ejections.load()), MetricType::Counter));
    resends.metric.push_back(value_metric(labels, static_cast<double>(st.resends.load()), MetricType::Counter));
    for (auto [kind, n] : {std::pair{"prompt", st.prompt_tokens.load()}, std::pair{"completion", st.completion_tokens.load()}}) {
      auto l = labels;
      l.push_back({"kind", kind});
      tokens.metric.push_back(value_metric(std::move(l), static_cast<double>(n), MetricType::Counter));
    }
    probes.metric.push_back(histogram_metric(labels, st.probe_duration));
  }

  auto gw_requests = family("infergate_requests_total", "Requests the gateway answered, proxied or refused itself, by status class, and client_closed: proxied requests whose client left before any answer (not scrapes, probes, the status page or admin calls)", MetricType::Counter);
  const char* classes[] = {"2xx", "4xx", "5xx"};
  for (std::size_t i = 0; i < 3; ++i) {
    gw_requests.metric.push_back(value_metric({{"code", classes[i]}},
                                              static_cast<double>(state.requests_by_class[i].load()), MetricType::Counter));
  }
  gw_requests.metric.push_back(value_metric({{"code", "client_closed"}},
                                            static_cast<double>(state.requests_client_closed.load()), MetricType::Counter));
  auto connections = family("infergate_client_connections", "Open client connections on the gateway port (metrics.listen scrapers not counted)", MetricType::Gauge);
  connections.metric.push_back(value_metric({}, static_cast<double>(state.client_connections.load()), MetricType::Gauge));
  auto connection_limit = family("infergate_client_connections_limit",
                                 "Client connections held at once (limits.max_client_connections); more wait to be accepted",
                                 MetricType::Gauge);
  connection_limit.metric.push_back(
      value_metric({}, static_cast<double>(state.max_client_connections), MetricType::Gauge));
  auto body_memory = family("infergate_request_body_bytes",
                            "Request-body bytes held at once, bodies over 64 KiB (limits.max_body_memory bounds them)",
                            MetricType::Gauge);
  body_memory.metric.push_back(value_metric({}, static_cast<double>(state.body_memory.load()), MetricType::Gauge));
  auto body_memory_limit = family("infergate_request_body_bytes_limit",
                                  "limits.max_body_memory in effect: a body past it is answered 503 with Retry-After",
                                  MetricType::Gauge);
  body_memory_limit.metric.push_back(value_metric({}, static_cast<double>(state.max_body_memory), MetricType::Gauge));
  auto inflight_all = family("infergate_inflight_requests", "Requests in flight through the gateway, admin calls included (not scrapes, probes or the status page)", MetricType::Gauge);
  inflight_all.metric.push_back(value_metric({}, static_cast<double>(state.inflight_requests.load()), MetricType::Gauge));
  auto queued = family("infergate_queued_requests",
                       "Requests waiting for a backend with room (limits.max_inflight_per_backend)", MetricType::Gauge);
  queued.metric.push_back(value_metric({}, static_cast<double>(state.admission.queued()), MetricType::Gauge));
  auto queue_limit = family("infergate_inflight_per_backend_limit",
                            "limits.max_inflight_per_backend in effect (0: no limit, no queue)", MetricType::Gauge);
  queue_limit.metric.push_back(value_metric({}, static_cast<double>(state.admission.per_backend()), MetricType::Gauge));
  auto rejected = family("infergate_queue_rejected_total",
                         "Requests refused for want of a backend with room: reason full (429, limits.max_queued "
                         "waiting already) or timeout (503, none within timeouts.queue)",
                         MetricType::Counter);
  rejected.metric.push_back(value_metric({{"reason", "full"}}, static_cast<double>(state.admission.rejected_full.load()),
                                         MetricType::Counter));
  rejected.metric.push_back(value_metric({{"reason", "timeout"}},
                                         static_cast<double>(state.admission.rejected_timeout.load()), MetricType::Counter));
  auto healthy = family("infergate_healthy_backends", "Backends receiving traffic", MetricType::Gauge);
  healthy.metric.push_back(value_metric({}, static_cast<double>(set->routable.size()), MetricType::Gauge));
  auto build = family("infergate_build_info", "Build information", MetricType::Gauge);
  build.metric.push_back(value_metric({{"version", INFERGATE_VERSION}}, 1, MetricType::Gauge));

  for (auto* f : {&up, &states, &inflight, &requests, &duration, &ttft, &retries, &ejections, &resends, &tokens,
                  &probes, &gw_requests, &connections, &connection_limit, &body_memory, &body_memory_limit, &inflight_all, &queued, &queue_limit, &rejected, &healthy, &build}) {
    families.push_back(std::move(*f));
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace infergate::gateway
