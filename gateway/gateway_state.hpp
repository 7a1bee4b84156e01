// State every worker thread shares: the immutable config, the backend registry and a few
// gateway-wide atomics. Nothing here takes a lock on the request path.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <utility>

#include "config/config.hpp"
#include "discovery/health_checker.hpp"
#include "discovery/registry.hpp"
#include "gateway/admission.hpp"
#include "gateway/retry_policy.hpp"

namespace infergate::gateway {

// One of the limits.max_client_connections places. An acceptor takes it before it accepts (so
// N worker threads never accept past the limit together); it then follows the client's socket
// (session, stream relay, the next session) and is given back when that connection closes.
class ConnectionSlot {
 public:
  ConnectionSlot() = default;  // holds none: the metrics listener is not limited
  // A slot if fewer than `limit` are taken (limit <= 0: no limit), else one that holds none.
  static ConnectionSlot try_take(std::atomic<std::int64_t>& taken, std::int64_t limit) noexcept {
    auto n = taken.load(std::memory_order_relaxed);
    do {
      if (limit > 0 && n >= limit) return {};
    } while (!taken.compare_exchange_weak(n, n + 1, std::memory_order_relaxed));
    return ConnectionSlot(&taken);
  }
  ConnectionSlot(ConnectionSlot&& other) noexcept : taken_(std::exchange(other.taken_, nullptr)) {}
  ConnectionSlot& operator=(ConnectionSlot&& other) noexcept {
    if (this != &other) {
      release();
      taken_ = std::exchange(other.taken_, nullptr);
    }
    return *this;
  }
  ConnectionSlot(const ConnectionSlot&) = delete;
  ConnectionSlot& operator=(const ConnectionSlot&) = delete;
  ~ConnectionSlot() { release(); }
  explicit operator bool() const noexcept { return taken_ != nullptr; }

 private:
  explicit ConnectionSlot(std::atomic<std::int64_t>* taken) noexcept : taken_(taken) {}
  void release() noexcept {
    if (taken_ != nullptr) taken_->fetch_sub(1, std::memory_order_relaxed);
    taken_ = nullptr;
  }
  std::atomic<std::int64_t>* taken_ = nullptr;
};

// The request-body bytes one request holds, counted against limits.max_body_memory with every
// other connection's (`held`); given back when the request is done with (release) or the
// connection ends.
class BodyReservation {
 public:
  explicit BodyReservation(std::atomic<std::uint64_t>* held) noexcept : held_(held) {}
  BodyReservation(const BodyReservation&) = delete;
  BodyReservation& operator=(const BodyReservation&) = delete;
  ~BodyReservation() { release(); }
  // Holds `total` bytes in all (more than now) if every connection's together stay within
  // `limit`; false, holding what it held, if not.
  bool grow_to(std::uint64_t total, std::uint64_t limit) noexcept {
    if (total <= bytes_) return true;
    const auto more = total - bytes_;
    auto n = held_->load(std::memory_order_relaxed);
    do {
      if (n + more > limit) return false;
    } while (!held_->compare_exchange_weak(n, n + more, std::memory_order_relaxed));
    bytes_ = total;
    return true;
  }
  void release() noexcept {
    if (bytes_ != 0) held_->fetch_sub(bytes_, std::memory_order_relaxed);
    bytes_ = 0;
  }
  std::uint64_t bytes() const noexcept { return bytes_; }

 private:
  std::atomic<std::uint64_t>* held_;
  std::uint64_t bytes_ = 0;
};

// This gateway's entry in the Via field of the requests it forwards (RFC 9110 7.6.3): a name of
// its own per process, so that a request coming back to it (the gateway listed as one of its own
// backends, or two gateways as each other's) is seen as a loop.
inline std::string make_via() {
  std::string via = "1.1 infergate-";
  auto v = std::random_device{}();
  for (int i = 0; i < 8; ++i, v >>= 4) via += "0123456789abcdef"[v & 0xf];
  return via;
}

struct GatewayState {
  explicit GatewayState(config::Config cfg, std::string how)
      : config(std::move(cfg)),
        registry(discovery::BackendState::kStarting),
        discovery_how(std::move(how)),
        via(make_via()),
        retry(config.retries.max, config.retries.backoff_base, config.retries.backoff_max),
        admission(registry, config.limits.max_inflight_per_backend,
                  static_cast<std::size_t>(config.limits.max_queued)) {
    registry.set_least_inflight(config.policy == "least_inflight");
  }

  const config::Config config;
  discovery::Registry registry;
  const std::string discovery_how;  // said in 503 answers when there is no backend
  const std::string via;            // "1.1 infergate-<random>", added to every forwarded request
  const RetryPolicy retry;
  Admission admission;  // limits.max_inflight_per_backend and the queue for a place
  discovery::HealthChecker* health = nullptr;  // set by the server before serving
  // Set by the server: asks every worker to close a few connections idle between requests (at
  // the connection limit, to make room for clients waiting to be accepted).
  std::function<void()> reclaim_idle_connections;

  // Requests the gateway answered, by status class: 0: 1xx-3xx ("2xx"), 1: 4xx, 2: 5xx.
  std::array<std::atomic<std::uint64_t>, 3> requests_by_class{};
  void count_response(unsigned status) noexcept {
    requests_by_class[status >= 500 ? 2 : status >= 400 ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  }
  // Proxied requests whose client left before any answer came (nginx logs them as 499): with
  // the status classes they account for every request read.
  std::atomic<std::uint64_t> requests_client_closed{0};

  std::atomic<std::int64_t> inflight_requests{0};
  // Requests whose first bytes came and which are not read whole yet: a shutdown waits for them
  // as for requests in flight (a large prompt still uploading is served, not cut).
  std::atomic<std::int64_t> arriving_requests{0};
  std::atomic<std::int64_t> client_connections{0};
  // The effective limits.max_client_connections, set before serving, and the slots taken of
  // it (see ConnectionSlot): when none is left the acceptors wait and new clients queue in the
  // listen backlog.
  std::int64_t max_client_connections = 0;
  std::atomic<std::int64_t> connection_slots{0};
  // The effective limits.max_body_memory, set before serving, and the request-body bytes held
  // of it now (see BodyReservation).
  std::uint64_t max_body_memory = 0;
  std::atomic<std::uint64_t> body_memory{0};
  std::atomic<bool> stopping{false};
  // timeouts.shutdown ran out: every wait still under way was ended, requests that had no answer
  // yet get a 503 saying so, and nothing that breaks now counts against a backend.
  std::atomic<bool> shutdown_cut{false};
  const std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
};

}  // namespace infergate::gateway
