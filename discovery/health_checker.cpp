#include "discovery/health_checker.hpp"

#include "discovery/http1.hpp"
#include "discovery/json_depth.hpp"
#include "discovery/resolve.hpp"
#include "discovery/timed_socket.hpp"

#include <spdlog/spdlog.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http/error.hpp>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <unordered_map>
#include <unordered_set>

namespace infergate::discovery {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
constexpr auto kTuple = net::as_tuple(net::use_awaitable);
// For each probe's reads and waits: a deferred operation is awaited directly, without the extra
// coroutine frame use_awaitable allocates for every operation (probes of many backends are in
// flight together, more than Asio's per-thread cache of freed frames holds).
constexpr auto kDirect = net::as_tuple(net::deferred);
constexpr auto kModelsRefresh = std::chrono::seconds(30);

struct ProbeResult {
  bool ok = false;
  std::string detail;
  std::string body;
};

// A kept-alive connection for one kind of probe of one backend. The request bytes are built
// once; a probe is then one write and usually one read, with one timer for its deadline.
struct ProbeConnection {
  ProbeConnection(DeadlineList& deadlines, const net::any_io_executor& ex) : sock(deadlines, ex) {}
  TimedSocket sock;
  http1::ByteBuffer buffer;
  http1::Head head;
  std::string request;
  Clock::time_point deadline;  // of the current exchange
  // The backend's addresses, looked up once and again only after a connect fails: a name
  // server that stops answering then costs nothing while the backend is reachable.
  std::vector<tcp::endpoint> endpoints;
  bool resolve_failed = false;  // the last connect failed in looking up the host name
};

constexpr std::size_t kProbeBodyLimit = 4 * 1024 * 1024;

void close_probe_connection(ProbeConnection& c) {
  c.sock.close();
  c.buffer.clear();
}

net::awaitable<beast::error_code> connect_probe(ProbeConnection& c, const BackendInfo& info) {
  if (c.endpoints.empty()) {
    auto [rec, results] =
        co_await resolve_by(c.sock.socket().get_executor(), info.host, std::to_string(info.port), c.deadline);
    c.resolve_failed = rec && rec != beast::error::timeout;
    if (rec) co_return rec;
    for (const auto& r : results) c.endpoints.push_back(r.endpoint());
  }
  c.sock.arm_at(c.deadline);
  auto [cec, ep] = co_await net::async_connect(c.sock.socket(), c.endpoints, kTuple);
  auto ec = c.sock.settle(cec);
  if (ec) c.endpoints.clear();  // the address may have moved
  if (!ec) c.sock.socket().non_blocking(true, ec);  // for send_now
  co_return ec;
}

// Reads one response into `c.head` (and its body into `body` when wanted). Returns whether the
// connection can carry the next probe.
net::awaitable<beast::error_code> read_probe_response(ProbeConnection& c, std::string* body, bool* keep_alive) {
  for (;;) {
    const auto parsed = http1::parse_response(c.buffer.data(), 64 * 1024, c.head);
    if (parsed == http1::Parse::kComplete && (c.head.status < 100 || c.head.status >= 200)) break;
    if (parsed == http1::Parse::kComplete) {  // an interim answer
      c.buffer.consume(c.head.size);
      continue;
    }
    if (parsed != http1::Parse::kIncomplete) co_return beast::http::error::bad_value;
    auto [room_ptr, room] = c.buffer.prepare(512);
    c.sock.arm_at(c.deadline);
    auto [rec, n] = co_await c.sock.socket().async_read_some(net::buffer(room_ptr, room), kDirect);
    if (auto ec = c.sock.settle(rec)) co_return ec;
    c.buffer.commit(n);
  }
  using Kind = http1::BodyFramer::Kind;
  const Kind kind = c.head.status == 204 || c.head.status == 304 ? Kind::kNone
                    : c.head.chunked                             ? Kind::kChunked
                    : c.head.content_length                      ? Kind::kLength
                                                                 : Kind::kUntilClose;
  *keep_alive = c.head.keep_alive() && kind != Kind::kUntilClose;
  http1::BodyFramer framer(kind, c.head.content_length.value_or(0), true);
  c.buffer.consume(c.head.size);  // the head's views are not used from here on
  for (;;) {
    const auto step = framer.step(c.buffer.data());
    if (step.bad) co_return beast::http::error::bad_chunk;
    if (body != nullptr) {
      if (body->size() + step.payload.size() > kProbeBodyLimit) co_return beast::http::error::body_limit;
      body->append(step.payload);
    }
    c.buffer.consume(step.consumed);
    if (step.last) break;
    auto [room_ptr, room] = c.buffer.prepare(body != nullptr ? 16 * 1024 : 512);
    c.sock.arm_at(c.deadline);
    auto [rec, n] = co_await c.sock.socket().async_read_some(net::buffer(room_ptr, room), kDirect);
    const auto ec = c.sock.settle(rec);
    if (ec == net::error::eof && kind == Kind::kUntilClose) {
      framer.end_of_stream();
      continue;
    }
    if (ec) co_return ec;
    c.buffer.commit(n);
  }
  if (c.buffer.size() != 0) *keep_alive = false;  // bytes nobody asked for: out of step
  co_return beast::error_code{};
}

// One GET over a kept-alive connection (reconnecting when needed), bounded by `timeout`.
net::awaitable<ProbeResult> http_get(ProbeConnection* c, const BackendInfo* info, std::string_view target,
                                     std::chrono::milliseconds timeout, bool want_body) {
  ProbeResult result;
  if (c->request.empty()) {
    c->request.reserve(96 + target.size() + info->id.size());
    c->request.append("GET ").append(target).append(" HTTP/1.1\r\nHost: ").append(info->id);
    c->request.append("\r\nUser-Agent: infergate-health\r\n\r\n");
  }
  c->deadline = Clock::now() + timeout;
  for (int tries = 0; tries < 2; ++tries) {
    const bool reused = c->sock.socket().is_open();
    if (!reused) {
      c->buffer.clear();
      if (auto ec = co_await connect_probe(*c, *info)) {
        close_probe_connection(*c);
        result.detail = ec == beast::error::timeout ? "timeout"
                        : c->resolve_failed        ? "resolve " + info->host + ": " + ec.message()
                                                   : "connect: " + ec.message();
        co_return result;
      }
    }
    // The request is a few dozen bytes: an empty send buffer takes it at once, without a queued
    // completion (the reply is not there yet either way: the read waits for it).
    beast::error_code ec;
    if (const auto rest = send_now(c->sock.socket(), net::buffer(c->request), ec); !ec && rest.size() > 0) {
      c->sock.arm_at(c->deadline);
      auto [wec, wn] = co_await net::async_write(c->sock.socket(), rest, kTuple);
      ec = c->sock.settle(wec);
    }
    bool keep_alive = false;
    if (!ec) ec = co_await read_probe_response(*c, want_body ? &result.body : nullptr, &keep_alive);
    if (ec) {
      close_probe_connection(*c);
      result.body.clear();
      if (reused && ec != beast::error::timeout) continue;  // the backend closed the idle probe connection
      result.detail = ec == beast::error::timeout ? "timeout" : ec.message();
      co_return result;
    }
    const auto status = c->head.status;
    result.ok = status >= 200 && status < 300;
    result.detail = "HTTP ";
    result.detail += std::to_string(status);
    if (!keep_alive) close_probe_connection(*c);
    if (want_body) c->buffer.release();  // a models list can be large; it comes every 30 s
    co_return result;
  }
  co_return result;
}

std::vector<Backend::Model> parse_models(const std::string& body) {
  std::vector<Backend::Model> models;
  // Each model object is written out again (dump() recurses): a list nested too deep for that
  // is no list of models.
  if (!json_depth_within(body)) return models;
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("data") || !j["data"].is_array()) return models;
  for (const auto& m : j["data"]) {
    if (m.is_object() && m.contains("id") && m["id"].is_string()) models.push_back({m["id"].get<std::string>(), m.dump()});
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
  DeadlineList deadlines;  // before `io`: probe sockets unlink themselves when destroyed
  net::io_context io{1};
  net::executor_work_guard<net::io_context::executor_type> work;
  std::thread thread;
  std::unordered_map<std::size_t, HealthTracker> trackers;  // by backend index; checker thread only
  // Backends waiting to be removed once idle; an undrain or a re-add takes one out again.
  // Checker thread only.
  std::unordered_set<std::size_t> pending_removal;
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
    // The request path's count starts again with the backend: Registry::pick skips a backend
    // whose count reached passive.failures, and one back in service must be routable.
    if (t->to == BackendState::kHealthy) {
      b.stats.consecutive_failures.store(0, std::memory_order_relaxed);
      b.stats.report_next_success.store(true, std::memory_order_relaxed);
    }
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
  ProbeConnection conn(impl->deadlines, impl->io.get_executor());
  ProbeConnection models_conn(impl->deadlines, impl->io.get_executor());
  Clock::time_point models_fetched{};
  bool warned_unresolved = false;
  const auto interval = impl->config.health.interval;
  // The first probe goes out quickly, spread over a short window.
  std::uniform_int_distribution<std::int64_t> first(0, std::min<std::int64_t>(interval.count(), 200));
  timer.expires_after(std::chrono::milliseconds(first(impl->rng)));
  for (;;) {
    auto [tec] = co_await timer.async_wait(kDirect);
    if (tec || impl->stopping || backend->state() == BackendState::kRemoved) co_return;
    const auto started = Clock::now();
    auto result =
        co_await http_get(&conn, &backend->info(), impl->config.health.path, impl->config.health.timeout, false);
    const auto finished = Clock::now();
    if (impl->stopping || backend->state() == BackendState::kRemoved) co_return;
    backend->stats.probe_duration.observe(finished - started);
    // A name that does not resolve is no warm-up state (the server may take minutes to load, its
    // node's name does not): say so once, even for a backend that has never been healthy.
    if (conn.resolve_failed && !warned_unresolved) {
      spdlog::warn("backend {}: {}; {}", backend->info().id, result.detail,
                   backend->info().source == "slurm"
                       ? "check the host names (Slurm's node names with slurm.domain and slurm.host_suffix appended)"
                   : backend->info().source == "admin"
                       ? "check the host name in the URL added through the admin API"
                       : "check the host name in its URL (backends, --backend)");
    }
    warned_unresolved = conn.resolve_failed;
    backend->set_last_probe({std::chrono::system_clock::now(), result.ok, result.detail});
    auto& tracker = impl->tracker(*backend);
    impl->apply(*backend, tracker.on_probe(result.ok, finished, result.detail));

    const auto state = backend->state();
    const bool serving = state == BackendState::kHealthy || state == BackendState::kDraining;
    if (serving && (models_fetched == Clock::time_point{} || finished - models_fetched >= kModelsRefresh)) {
      auto models = co_await http_get(&models_conn, &backend->info(), "/v1/models", impl->config.health.timeout, true);
      if (models.ok) {
        backend->set_models(parse_models(models.body));
        models_fetched = Clock::now();
      }
      backend->models_asked.store(true);
    } else if (!serving) {
      models_fetched = {};
    }
    timer.expires_at(quantized(Clock::now() + impl->jittered(interval)));
  }
}

}  // namespace

HealthChecker::HealthChecker(const config::Config& config, Registry& registry)
    : impl_(std::make_unique<Impl>(config, registry)) {
  registry.set_passive_limit(config.passive.failures);
}

HealthChecker::~HealthChecker() { stop(); }

void HealthChecker::start() {
  net::co_spawn(impl_->io, sweep_forever(impl_->deadlines, "health checker", {}), net::detached);
  const auto set = impl_->registry.snapshot();  // held: a range-for would not keep it alive
  for (const auto& b : set->all) {
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

void HealthChecker::report(const std::shared_ptr<Backend>& backend, bool failed, std::uint64_t failures_at_head) {
  auto& consecutive = backend->stats.consecutive_failures;
  if (failed) backend->stats.failures_reported.fetch_add(1, std::memory_order_relaxed);
  if (!failed) {
    if (failures_at_head != kNoSnapshot &&
        backend->stats.failures_reported.load(std::memory_order_relaxed) != failures_at_head) {
      return;  // failures came after this response began: they are the newer news
    }
    // The common case touches two relaxed loads: only a success after failures, or the first
    // one after the backend came back, is news.
    auto& first_since_back = backend->stats.report_next_success;
    if (consecutive.load(std::memory_order_relaxed) == 0 && !first_since_back.load(std::memory_order_relaxed)) return;
    consecutive.store(0, std::memory_order_relaxed);
    first_since_back.store(false, std::memory_order_relaxed);
  }
  const int in_a_row = failed ? consecutive.fetch_add(1, std::memory_order_relaxed) + 1 : 0;
  net::post(impl_->io, [impl = impl_.get(), backend, failed, in_a_row] {
    // A request that ended after its backend was removed: there is no tracker to tell (one made
    // now would never be freed).
    if (backend->state() == BackendState::kRemoved) return;
    // A count above today's was made before the backend came back (apply resets it), by a
    // request that was in flight then: it says nothing about the backend in service now.
    const int now_in_a_row = backend->stats.consecutive_failures.load(std::memory_order_relaxed);
    auto& tracker = impl->tracker(*backend);
    impl->apply(*backend, tracker.on_request(failed, Clock::now(), in_a_row <= now_in_a_row ? in_a_row : 0));
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
    if (impl->pending_removal.erase(backend->index()) > 0) {
      spdlog::info("backend {}: removal cancelled", backend->info().id);
    }
    auto t = impl->tracker(*backend).undrain(Clock::now());
    impl->apply(*backend, t);
    return t.has_value();
  });
}

namespace {
net::awaitable<void> remove_after_drain(HealthChecker::Impl* impl, std::shared_ptr<Backend> backend,
                                        Clock::time_point deadline) {
  net::steady_timer timer(impl->io);
  while (backend->stats.inflight.load() > 0 && Clock::now() < deadline &&
         impl->pending_removal.contains(backend->index())) {
    timer.expires_after(std::chrono::milliseconds(50));
    co_await timer.async_wait(kTuple);
  }
  if (impl->pending_removal.erase(backend->index()) == 0) co_return;  // undrained or added again meanwhile
  if (const auto left = backend->stats.inflight.load(); left > 0) {
    spdlog::warn("backend {}: removing it with {} request(s) still in flight after waiting {}ms (timeouts.shutdown); "
                 "they run on to their end, but stopping the server now would cut them",
                 backend->info().id, left, impl->config.timeouts.shutdown.count());
  }
  impl->tracker(*backend).remove();
  // By identity, not by id alone: a second DELETE that found this backend just before an earlier
  // removal finished, followed by an add of the same URL, must not remove the new backend.
  if (impl->registry.find(backend->info().id) == backend) impl->registry.remove(backend->info().id);
  impl->trackers.erase(backend->index());
  spdlog::info("backend {}: removed", backend->info().id);
}
}  // namespace

void HealthChecker::remove_when_idle(std::shared_ptr<Backend> backend, std::chrono::milliseconds deadline) {
  // Marked and drained in one step on the health thread: an add of the same URL in between
  // would cancel the removal and then see its backend drained for good.
  const bool first = run_on(impl_->io, [impl = impl_.get(), &backend] {
    const bool inserted = impl->pending_removal.insert(backend->index()).second;
    impl->apply(*backend, impl->tracker(*backend).drain());
    return inserted;
  });
  if (!first) return;  // already on its way out
  net::co_spawn(impl_->io, remove_after_drain(impl_.get(), std::move(backend), Clock::now() + deadline),
                net::detached);
}

std::pair<std::shared_ptr<Backend>, bool> HealthChecker::add(BackendInfo info) {
  return run_on(impl_->io, [impl = impl_.get(), &info]() -> std::pair<std::shared_ptr<Backend>, bool> {
    if (auto existing = impl->registry.find(info.id)) {
      if (impl->pending_removal.erase(existing->index()) > 0) {
        spdlog::info("backend {}: added again, removal cancelled", existing->info().id);
        impl->apply(*existing, impl->tracker(*existing).undrain(Clock::now()));
      }
      return {existing, false};
    }
    auto added = impl->registry.add(std::move(info));
    net::co_spawn(impl->io, probe_loop(impl, added), net::detached);
    return {added, true};
  });
}

bool HealthChecker::removal_pending(const std::shared_ptr<Backend>& backend) {
  return run_on(impl_->io, [impl = impl_.get(), &backend] { return impl->pending_removal.contains(backend->index()); });
}

}  // namespace infergate::discovery
