#include "discovery/health_checker.hpp"

#include <spdlog/spdlog.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <unordered_map>

namespace infergate::discovery {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
constexpr auto kTuple = net::as_tuple(net::use_awaitable);
constexpr auto kModelsRefresh = std::chrono::seconds(30);

struct ProbeResult {
  bool ok = false;
  std::string detail;
  std::string body;
};

// One GET over a kept-alive connection (reconnecting when needed), bounded by `timeout`.
net::awaitable<ProbeResult> http_get(std::unique_ptr<beast::tcp_stream>* conn, const BackendInfo* info,
                                     std::string target, std::chrono::milliseconds timeout) {
  ProbeResult result;
  auto executor = co_await net::this_coro::executor;
  const auto deadline = Clock::now() + timeout;
  for (int tries = 0; tries < 2; ++tries) {
    const bool reused = *conn != nullptr;
    if (!*conn) {
      *conn = std::make_unique<beast::tcp_stream>(executor);
      tcp::resolver resolver(executor);
      (*conn)->expires_at(deadline);
      auto [rec, endpoints] = co_await resolver.async_resolve(info->host, std::to_string(info->port), kTuple);
      if (rec) {
        conn->reset();
        result.detail = "resolve: " + rec.message();
        co_return result;
      }
      auto [cec, ep] = co_await (*conn)->async_connect(endpoints, kTuple);
      if (cec) {
        conn->reset();
        result.detail = cec == beast::error::timeout ? "timeout" : cec.message();
        co_return result;
      }
    }
    http::request<http::empty_body> req{http::verb::get, target, 11};
    req.set(http::field::host, info->id);
    req.set(http::field::user_agent, "infergate-health");
    (*conn)->expires_at(deadline);
    auto [wec, wn] = co_await http::async_write(**conn, req, kTuple);
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(4 * 1024 * 1024);
    beast::error_code ec = wec;
    if (!ec) {
      auto [rec, rn] = co_await http::async_read(**conn, buffer, parser, kTuple);
      ec = rec;
    }
    if (ec) {
      conn->reset();
      if (reused && ec != beast::error::timeout) continue;  // the backend closed the idle probe connection
      result.detail = ec == beast::error::timeout ? "timeout" : ec.message();
      co_return result;
    }
    auto& res = parser.get();
    result.ok = res.result_int() >= 200 && res.result_int() < 300;
    result.detail = "HTTP " + std::to_string(res.result_int());
    result.body = std::move(res.body());
    if (!res.keep_alive()) conn->reset();
    co_return result;
  }
  co_return result;
}

std::vector<std::string> parse_models(const std::string& body) {
  std::vector<std::string> models;
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.contains("data") || !j["data"].is_array()) return models;
  for (const auto& m : j["data"]) {
    if (m.is_object() && m.contains("id") && m["id"].is_string()) models.push_back(m["id"].get<std::string>());
  }
  return models;
}

}  // namespace

struct HealthChecker::Impl {
  Impl(const config::Config& cfg, Registry& reg)
      : config(cfg),
        registry(reg),
        policy{cfg.health.healthy_threshold, cfg.health.unhealthy_threshold, cfg.passive.failures,
               cfg.passive.ejection_base, cfg.passive.ejection_max},
        work(net::make_work_guard(io)) {}

  const config::Config& config;
  Registry& registry;
  HealthPolicy policy;
  net::io_context io{1};
  net::executor_work_guard<net::io_context::executor_type> work;
  std::thread thread;
  std::unordered_map<std::size_t, HealthTracker> trackers;  // by backend index; checker thread only
  std::minstd_rand rng{std::random_device{}()};
  bool stopping = false;

  HealthTracker& tracker(const Backend& b) {
    auto it = trackers.find(b.index());
    if (it == trackers.end()) it = trackers.emplace(b.index(), HealthTracker(policy, b.state())).first;
    return it->second;
  }

  void apply(Backend& b, const std::optional<Transition>& t) {
    if (!t) return;
    b.set_state(t->to);
    registry.republish();
    if (t->to == BackendState::kEjected) b.stats.ejections.fetch_add(1, std::memory_order_relaxed);
    if (t->to == BackendState::kUnhealthy || t->to == BackendState::kEjected) {
      b.set_last_error(t->reason);
      spdlog::warn("backend {}: {} -> {} ({})", b.info().id, to_string(t->from), to_string(t->to), t->reason);
    } else {
      spdlog::info("backend {}: {} -> {} ({})", b.info().id, to_string(t->from), to_string(t->to), t->reason);
    }
  }

  std::chrono::milliseconds jittered(std::chrono::milliseconds base) {
    // +-10%, so probes of many backends started together drift apart.
    std::uniform_real_distribution<double> factor(0.9, 1.1);
    return std::chrono::milliseconds(static_cast<std::int64_t>(static_cast<double>(base.count()) * factor(rng)));
  }
};

namespace {

// Probe times are rounded up to 50 ms slots so that probes of many backends share wake-ups:
// with 1,024 backends at 1 s each wake-up costs more than the probe itself.
Clock::time_point quantized(Clock::time_point t) {
  constexpr auto kSlot = std::chrono::milliseconds(50);
  const auto since = t.time_since_epoch();
  const auto rem = since % kSlot;
  return rem == Clock::duration::zero() ? t : t + (kSlot - rem);
}

net::awaitable<void> probe_loop(HealthChecker::Impl* impl, std::shared_ptr<Backend> backend) {
  net::steady_timer timer(impl->io);
  std::unique_ptr<beast::tcp_stream> conn;
  std::unique_ptr<beast::tcp_stream> models_conn;
  Clock::time_point models_fetched{};
  const auto interval = impl->config.health.interval;
  // The first probe goes out quickly, spread over a short window.
  std::uniform_int_distribution<std::int64_t> first(0, std::min<std::int64_t>(interval.count(), 200));
  timer.expires_after(std::chrono::milliseconds(first(impl->rng)));
  for (;;) {
    auto [tec] = co_await timer.async_wait(kTuple);
    if (tec || impl->stopping || backend->state() == BackendState::kRemoved) co_return;
    const auto started = Clock::now();
    auto result = co_await http_get(&conn, &backend->info(), impl->config.health.path, impl->config.health.timeout);
    const auto finished = Clock::now();
    if (impl->stopping || backend->state() == BackendState::kRemoved) co_return;
    backend->stats.probe_duration.observe(finished - started);
    backend->set_last_probe({std::chrono::system_clock::now(), result.ok, result.detail});
    auto& tracker = impl->tracker(*backend);
    impl->apply(*backend, tracker.on_probe(result.ok, finished, result.detail));

    const auto state = backend->state();
    const bool serving = state == BackendState::kHealthy || state == BackendState::kDraining;
    if (serving && (models_fetched == Clock::time_point{} || finished - models_fetched >= kModelsRefresh)) {
      auto models = co_await http_get(&models_conn, &backend->info(), "/v1/models", impl->config.health.timeout);
      if (models.ok) {
        backend->set_models(parse_models(models.body));
        models_fetched = Clock::now();
      }
    } else if (!serving) {
      models_fetched = {};
    }
    timer.expires_at(quantized(Clock::now() + impl->jittered(interval)));
  }
}

}  // namespace

HealthChecker::HealthChecker(const config::Config& config, Registry& registry)
    : impl_(std::make_unique<Impl>(config, registry)) {}

HealthChecker::~HealthChecker() { stop(); }

void HealthChecker::start() {
  for (const auto& b : impl_->registry.snapshot()->all) {
    net::co_spawn(impl_->io, probe_loop(impl_.get(), b), net::detached);
  }
  impl_->thread = std::thread([impl = impl_.get()] {
    for (;;) {
      try {
        impl->io.run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("health checker: {}", e.what());
      }
    }
  });
}

void HealthChecker::stop() {
  if (!impl_->thread.joinable()) return;
  net::post(impl_->io, [impl = impl_.get()] { impl->stopping = true; });
  impl_->work.reset();
  impl_->io.stop();
  impl_->thread.join();
}

void HealthChecker::watch(std::shared_ptr<Backend> backend) {
  net::co_spawn(impl_->io, probe_loop(impl_.get(), std::move(backend)), net::detached);
}

void HealthChecker::report(const std::shared_ptr<Backend>& backend, bool failed) {
  auto& consecutive = backend->stats.consecutive_failures;
  if (!failed) {
    // The common case touches one relaxed load: only a success after failures is news.
    if (consecutive.load(std::memory_order_relaxed) == 0) return;
    consecutive.store(0, std::memory_order_relaxed);
  } else {
    consecutive.fetch_add(1, std::memory_order_relaxed);
  }
  net::post(impl_->io, [impl = impl_.get(), backend, failed] {
    auto& tracker = impl->tracker(*backend);
    impl->apply(*backend, tracker.on_request(failed, Clock::now()));
  });
}

namespace {
template <typename F>
auto run_on(net::io_context& io, F f) {
  // Not posted as a packaged_task itself: Asio treats that as a completion token and takes
  // its future.
  auto task = std::make_shared<std::packaged_task<decltype(f())()>>(std::move(f));
  auto result = task->get_future();
  net::post(io, [task] { (*task)(); });
  return result.get();
}
}  // namespace

bool HealthChecker::drain(const std::shared_ptr<Backend>& backend) {
  return run_on(impl_->io, [impl = impl_.get(), backend] {
    auto t = impl->tracker(*backend).drain();
    impl->apply(*backend, t);
    return t.has_value();
  });
}

bool HealthChecker::undrain(const std::shared_ptr<Backend>& backend) {
  return run_on(impl_->io, [impl = impl_.get(), backend] {
    auto t = impl->tracker(*backend).undrain();
    impl->apply(*backend, t);
    return t.has_value();
  });
}

namespace {
net::awaitable<void> remove_after_drain(HealthChecker::Impl* impl, std::shared_ptr<Backend> backend,
                                        Clock::time_point deadline) {
  net::steady_timer timer(impl->io);
  while (backend->stats.inflight.load() > 0 && Clock::now() < deadline) {
    timer.expires_after(std::chrono::milliseconds(50));
    co_await timer.async_wait(kTuple);
  }
  impl->tracker(*backend).remove();
  impl->registry.remove(backend->info().id);
  impl->trackers.erase(backend->index());
  spdlog::info("backend {}: removed", backend->info().id);
}
}  // namespace

void HealthChecker::remove_when_idle(std::shared_ptr<Backend> backend, std::chrono::milliseconds deadline) {
  drain(backend);
  net::co_spawn(impl_->io, remove_after_drain(impl_.get(), std::move(backend), Clock::now() + deadline),
                net::detached);
}

}  // namespace infergate::discovery
