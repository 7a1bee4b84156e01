// A backend's health as a pure state machine: active probe results, passive request results
// and operator actions go in; state transitions come out. No sockets, no clocks of its own.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "discovery/registry.hpp"

namespace infergate::discovery {

struct HealthPolicy {
  int healthy_threshold = 2;    // consecutive passing probes: starting/unhealthy -> healthy
  int unhealthy_threshold = 3;  // consecutive failing probes: healthy -> unhealthy
  int passive_failures = 3;     // consecutive failed requests: healthy -> ejected
  std::chrono::milliseconds ejection_base{1000};
  std::chrono::milliseconds ejection_max{60000};
};

struct Transition {
  BackendState from;
  BackendState to;
  std::string reason;
};

class HealthTracker {
 public:
  using Clock = std::chrono::steady_clock;

  explicit HealthTracker(HealthPolicy policy, BackendState initial = BackendState::kStarting)
      : policy_(policy), state_(initial) {}

  BackendState state() const noexcept { return state_; }
  Clock::time_point ejected_until() const noexcept { return ejected_until_; }
  int ejections() const noexcept { return ejections_; }

  std::optional<Transition> on_probe(bool passed, Clock::time_point now, const std::string& detail = {});
  // A request the backend served (`failed`: transport error, timeout or 5xx; a 4xx is the
  // client's fault and is reported as not failed). `in_a_row`: the failures in a row the
  // request path counted, this one included; the tracker counts at least as many, so an
  // ejection the router already acts on (Registry::pick) always happens.
  std::optional<Transition> on_request(bool failed, Clock::time_point now, int in_a_row = 0);

  std::optional<Transition> drain();
  std::optional<Transition> undrain(Clock::time_point now);
  std::optional<Transition> remove();

 private:
  std::optional<Transition> move_to(BackendState to, std::string reason);

  HealthPolicy policy_;
  BackendState state_;
  BackendState before_drain_ = BackendState::kStarting;
  int probe_passes_ = 0;
  int probe_failures_ = 0;
  int request_failures_ = 0;
  // Ejections in a row: the backoff doubles with each. A backend that stays in service for
  // passive.ejection_max without one starts again at the base: a success alone does not reset
  // it, or a backend that fails every other second (flapping) would be let back at the base
  // each time.
  int ejections_ = 0;
  Clock::time_point ejected_until_{};
  Clock::time_point in_service_since_{};  // when probes last brought it back to healthy
};

}  // namespace infergate::discovery
