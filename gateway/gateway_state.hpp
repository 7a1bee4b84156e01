// State every worker thread shares: the immutable config, the backend registry and a few
// gateway-wide atomics. Nothing here takes a lock on the request path.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "config/config.hpp"
#include "discovery/health_checker.hpp"
#include "discovery/registry.hpp"
#include "gateway/retry_policy.hpp"

namespace infergate::gateway {

struct GatewayState {
  explicit GatewayState(config::Config cfg, std::string how)
      : config(std::move(cfg)),
        registry(discovery::BackendState::kStarting),
        discovery_how(std::move(how)),
        retry(config.retries.max, config.retries.backoff_base, config.retries.backoff_max) {}

  const config::Config config;
  discovery::Registry registry;
  const std::string discovery_how;  // said in 503 answers when there is no backend
  const RetryPolicy retry;
  discovery::HealthChecker* health = nullptr;  // set by the server before serving

  // Requests the gateway answered, by status class: 0: 1xx-3xx ("2xx"), 1: 4xx, 2: 5xx.
  std::array<std::atomic<std::uint64_t>, 3> requests_by_class{};
  void count_response(unsigned status) noexcept {
    requests_by_class[status >= 500 ? 2 : status >= 400 ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  }

  std::atomic<std::int64_t> inflight_requests{0};
  std::atomic<std::int64_t> client_connections{0};
  std::atomic<bool> stopping{false};
  const std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
};

}  // namespace infergate::gateway
