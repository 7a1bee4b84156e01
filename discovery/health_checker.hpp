// Active health probes (one coroutine per backend on the checker's own thread) and passive
// reports from the request path, both feeding each backend's HealthTracker. Learns each
// healthy backend's models from /v1/models.
#pragma once

#include <chrono>
#include <functional>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "config/config.hpp"
#include "discovery/health_state.hpp"
#include "discovery/registry.hpp"

namespace infergate::discovery {

class HealthChecker {
 public:
  HealthChecker(const config::Config& config, Registry& registry);
  ~HealthChecker();
  HealthChecker(const HealthChecker&) = delete;
  HealthChecker& operator=(const HealthChecker&) = delete;

  // Starts the checker thread and probes every backend in the registry.
  void start();
  void stop();

  // Starts probing a backend added after start(). Thread-safe.
  void watch(std::shared_ptr<Backend> backend);
  // Adds a backend to the registry and probes it, in one step on the checker's thread, so that
  // concurrent adds of one URL, or an add racing the end of its removal, cannot leave it
  // probed twice or gone. A backend already present is returned (false), and a pending
  // removal of it is cancelled. Thread-safe.
  std::pair<std::shared_ptr<Backend>, bool> add(BackendInfo info);

  // Passive health from the request path. Thread-safe and cheap when nothing changes. A success
  // is reported when its response is through, which for a stream may be minutes after its head:
  // `failures_at_head` (stats.failures_reported read when the head came) keeps it from erasing
  // failures reported since, which are newer news about the backend.
  static constexpr std::uint64_t kNoSnapshot = ~std::uint64_t{0};
  void report(const std::shared_ptr<Backend>& backend, bool failed, std::uint64_t failures_at_head = kNoSnapshot);

  // Operator actions; thread-safe, return once applied. False when the action did not apply.
  bool drain(const std::shared_ptr<Backend>& backend);
  bool undrain(const std::shared_ptr<Backend>& backend);
  // Drains, waits for in-flight requests to finish (bounded), then removes from the registry,
  // unless an undrain (or adding the backend again) cancels the removal first.
  void remove_when_idle(std::shared_ptr<Backend> backend, std::chrono::milliseconds deadline);
  bool removal_pending(const std::shared_ptr<Backend>& backend);

  struct Impl;  // public so the checker's coroutines (free functions) can name it

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace infergate::discovery
