#include "discovery/health_state.hpp"

#include <algorithm>

namespace infergate::discovery {

std::optional<Transition> HealthTracker::move_to(BackendState to, std::string reason) {
  if (to == state_) return std::nullopt;
  Transition t{state_, to, std::move(reason)};
  state_ = to;
  // Passive ejection counts consecutive failures *while healthy*. Failures from before a state
  // change (in-flight requests that failed while the backend was starting, unhealthy, ejected
  // or draining) say nothing about the backend that just came back, and must not make one
  // failure after a recovery eject it.
  request_failures_ = 0;
  return t;
}

std::optional<Transition> HealthTracker::on_probe(bool passed, Clock::time_point now,
                                                  const std::string& detail) {
  if (passed) {
    probe_failures_ = 0;
    ++probe_passes_;
  } else {
    probe_passes_ = 0;
    ++probe_failures_;
  }
  switch (state_) {
    case BackendState::kStarting:
      // A server loading weights fails probes for minutes: that is not an alarm.
      if (probe_passes_ >= policy_.healthy_threshold) {
        in_service_since_ = now;
        return move_to(BackendState::kHealthy, "passed " + std::to_string(probe_passes_) + " probes");
      }
      return std::nullopt;
    case BackendState::kHealthy:
      if (probe_failures_ >= policy_.unhealthy_threshold) {
        return move_to(BackendState::kUnhealthy,
                       "failed " + std::to_string(probe_failures_) + " probes" +
                           (detail.empty() ? "" : ": " + detail));
      }
      return std::nullopt;
    case BackendState::kUnhealthy:
      // The ejection backoff (ejections_) is kept here on purpose: passing probes show that
      // the health endpoint answers, not that requests succeed, and a backend whose requests
      // keep failing (a crash loop: ejected, down, restarted, healthy, failing again) must see
      // its ejections grow as the design asks. It starts again at the base only once the
      // backend has served passive.ejection_max without an ejection (on_request).
      if (probe_passes_ >= policy_.healthy_threshold) {
        in_service_since_ = now;
        return move_to(BackendState::kHealthy, "passed " + std::to_string(probe_passes_) + " probes");
      }
      return std::nullopt;
    case BackendState::kEjected:
      if (!passed && probe_failures_ >= policy_.unhealthy_threshold) {
        return move_to(BackendState::kUnhealthy,
                       "failed " + std::to_string(probe_failures_) + " probes while ejected" +
                           (detail.empty() ? "" : ": " + detail));
      }
      if (passed && now >= ejected_until_) {
        in_service_since_ = now;
        return move_to(BackendState::kHealthy, "ejection over and probe passed");
      }
      return std::nullopt;
    case BackendState::kDraining:
    case BackendState::kRemoved:
      return std::nullopt;
  }
  return std::nullopt;
}

std::optional<Transition> HealthTracker::on_request(bool failed, Clock::time_point now, int in_a_row) {
  if (!failed) {
    request_failures_ = 0;
    return std::nullopt;
  }
  request_failures_ = std::max(request_failures_ + 1, in_a_row);
  if (state_ != BackendState::kHealthy || request_failures_ < policy_.passive_failures) {
    return std::nullopt;
  }
  if (now - in_service_since_ >= policy_.ejection_max) ejections_ = 0;  // served long enough since the last
  auto backoff = policy_.ejection_base;
  for (int i = 0; i < ejections_ && backoff < policy_.ejection_max; ++i) backoff *= 2;
  backoff = std::min(backoff, policy_.ejection_max);
  ++ejections_;
  ejected_until_ = now + backoff;
  const int failures = request_failures_;
  return move_to(BackendState::kEjected, std::to_string(failures) + " consecutive request failures; ejected for " +
                                             std::to_string(backoff.count()) + "ms");
}

std::optional<Transition> HealthTracker::drain() {
  if (state_ == BackendState::kDraining || state_ == BackendState::kRemoved) return std::nullopt;
  before_drain_ = state_;
  return move_to(BackendState::kDraining, "drained by operator");
}

std::optional<Transition> HealthTracker::undrain(Clock::time_point now) {
  if (state_ != BackendState::kDraining) return std::nullopt;
  // Probes went on during the drain: what they found last decides, not the state at drain time.
  // But passing probes do not end an ejection (they show the health endpoint answers, not that
  // requests succeed): an ejected backend undrained before its ejection is over is ejected
  // again until then.
  auto to = before_drain_;
  if (probe_failures_ >= policy_.unhealthy_threshold && before_drain_ != BackendState::kStarting) {
    to = BackendState::kUnhealthy;
  } else if (before_drain_ == BackendState::kEjected && now < ejected_until_) {
    to = BackendState::kEjected;
  } else if (to != BackendState::kHealthy && probe_passes_ >= policy_.healthy_threshold) {
    to = BackendState::kHealthy;
  }
  if (to == BackendState::kHealthy && before_drain_ != BackendState::kHealthy) in_service_since_ = now;
  return move_to(to, "undrained by operator");
}

std::optional<Transition> HealthTracker::remove() {
  return move_to(BackendState::kRemoved, "removed");
}

}  // namespace infergate::discovery
