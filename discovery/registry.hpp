// The live backend set every worker thread reads without locks: membership is an immutable
// snapshot swapped atomically; per-backend state and counters are atomics.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "discovery/discovery.hpp"

namespace infergate::discovery {

enum class BackendState : std::uint8_t { kStarting, kHealthy, kUnhealthy, kEjected, kDraining, kRemoved };
inline constexpr std::size_t kBackendStateCount = 6;
std::string_view to_string(BackendState state);

// A fixed-bucket histogram of durations that any thread records into with relaxed atomics.
class DurationHistogram {
 public:
  // Seconds; long tails up to 30 minutes because generations can take that long.
  static constexpr std::array<double, 19> kBounds = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                     0.5,   1,     2.5,  5,     10,   30,  60,
                                                     120,   300,   600,  1200,  1800};
  void observe(std::chrono::nanoseconds d) noexcept;
  // Cumulative counts per bound (Prometheus "le" semantics) plus +Inf last, and the sum.
  std::array<std::uint64_t, kBounds.size() + 1> cumulative() const noexcept;
  double sum_seconds() const noexcept;
  std::uint64_t count() const noexcept;

 private:
  std::array<std::atomic<std::uint64_t>, kBounds.size() + 1> buckets_{};
  std::atomic<std::uint64_t> sum_ns_{0};
};

// Per-backend traffic counters, written on the request path without locks.
struct BackendStats {
  std::atomic<std::int64_t> inflight{0};
  std::atomic<std::uint64_t> responses_2xx{0};  // also 1xx and 3xx: "not an error"
  std::atomic<std::uint64_t> responses_4xx{0};
  std::atomic<std::uint64_t> responses_5xx{0};
  std::atomic<std::uint64_t> errors{0};  // no response: connect failures, resets, timeouts
  std::atomic<std::uint64_t> retries{0};  // attempts on this backend that were retried elsewhere
  std::atomic<std::uint64_t> ejections{0};
  // Requests sent again on a new connection to it because the parked connection they went out
  // on was being closed (its idle close): the backend may have read the first copy.
  std::atomic<std::uint64_t> resends{0};
  std::atomic<std::uint64_t> prompt_tokens{0};
  std::atomic<std::uint64_t> completion_tokens{0};
  std::atomic<int> consecutive_failures{0};  // passive health: reset by a success
  // Every failure reported (passive health): a success reported when its long response ends
  // resets consecutive_failures only if none came after its head (see HealthChecker::report).
  std::atomic<std::uint64_t> failures_reported{0};
  // Set when the backend comes back: its next successful request is reported to the health
  // checker even though no failure came before it (that success resets the ejection backoff).
  std::atomic<bool> report_next_success{false};
  DurationHistogram duration;
  DurationHistogram ttft;
  DurationHistogram probe_duration;
};

class Backend : public std::enable_shared_from_this<Backend> {
 public:
  Backend(BackendInfo info, std::size_t index, BackendState initial)
      : info_(std::move(info)), index_(index), state_(initial) {}

  const BackendInfo& info() const noexcept { return info_; }
  // Stable for the life of the process and never reused: indexes per-thread upstream pools.
  std::size_t index() const noexcept { return index_; }

  BackendState state() const noexcept { return state_.load(std::memory_order_acquire); }
  void set_state(BackendState s) noexcept { state_.store(s, std::memory_order_release); }

  BackendStats stats;

  // Written by the health checker, read by the admin API and status page (not the hot path).
  struct ProbeRecord {
    std::chrono::system_clock::time_point time{};
    bool ok = false;
    std::string detail;  // "200", "connection refused", ...
  };
  ProbeRecord last_probe() const;
  void set_last_probe(ProbeRecord record);
  std::string last_error() const;
  void set_last_error(std::string error);
  // A model the backend lists in /v1/models: its id, and its object as the backend sent it
  // (JSON text: vLLM's carries max_model_len, root, ...), relayed as is by the gateway's list.
  struct Model {
    std::string id;
    std::string object;
  };
  std::vector<std::string> models() const;  // the ids
  std::vector<Model> model_objects() const;
  void set_models(std::vector<Model> models);
  // Its /v1/models has been asked for once at least (answered or not): until then an empty list
  // says nothing yet.
  std::atomic<bool> models_asked{false};


 private:
  BackendInfo info_;
  std::size_t index_;
  std::atomic<BackendState> state_;
  mutable std::mutex detail_mutex_;
  ProbeRecord last_probe_;
  std::string last_error_;
  std::vector<Model> models_;
};

struct BackendSet {
  std::vector<std::shared_ptr<Backend>> all;
  std::vector<Backend*> routable;  // healthy and not draining, in discovery order
};

class Registry {
 public:
  // Backends start in `initial` (kHealthy when no health checks run, kStarting otherwise).
  explicit Registry(BackendState initial = BackendState::kHealthy) : initial_(initial) {}

  std::shared_ptr<const BackendSet> snapshot() const noexcept {
    return set_.load(std::memory_order_acquire);
  }

  // Adds a backend unless its id is present; returns it (the existing one on duplicates).
  std::shared_ptr<Backend> add(BackendInfo info);
  // Marks removed and drops it from the set; false when the id is unknown.
  bool remove(std::string_view id);
  std::shared_ptr<Backend> find(std::string_view id) const;
  // Rebuilds the routable list after state changes.
  void republish();

  // Round robin over the routable set, skipping `exclude` (backends a request already tried).
  // One atomic counter: exact rotation across threads. nullptr when nothing is routable.
  // A backend whose last `passive_limit` requests in a row failed is skipped as well: its
  // ejection is decided but applied on the health checker's thread, and the next request must
  // not reach it meanwhile.
  // With `room_limit` > 0 (limits.max_inflight_per_backend), a backend with that many requests
  // in flight is skipped too (`*full` is then set), and the one returned has one of its places
  // taken for the caller (stats.inflight, see take_place).
  Backend* pick(const BackendSet& set, std::span<const Backend* const> exclude = {}, int room_limit = 0,
                bool* full = nullptr);
  // Takes one of `backend`'s in-flight places if fewer than `room_limit` are taken.
  static bool take_place(Backend& backend, int room_limit) noexcept;
  // Whether a request may go to `backend` now: healthy, not draining, not on its way to an
  // ejection (see pick).
  bool routable_now(const Backend& backend) const noexcept;

  // policy least_inflight: pick the backend with the fewest requests in flight, in rotation
  // order among equals (round robin otherwise). Set before serving starts.
  void set_least_inflight(bool on) noexcept { least_inflight_ = on; }
  // Consecutive failed requests that eject a backend (passive.failures); 0 (no health checks):
  // never skip. Set before serving starts.
  void set_passive_limit(int failures) noexcept { passive_limit_ = failures; }
  int passive_limit() const noexcept { return passive_limit_; }
  // Backends added since start (discovered, static or through the admin API), removed or not.
  std::size_t ever_added() const {
    std::lock_guard lock(write_mutex_);
    return next_index_;
  }

 private:
  void publish_locked(std::vector<std::shared_ptr<Backend>> all);
  Backend* pick_least(const BackendSet& set, std::span<const Backend* const> exclude, std::uint64_t start,
                      int room_limit, bool* full);
  // Its last passive.failures requests failed: its ejection is decided (see pick).
  bool failing(const Backend& backend) const noexcept;
  // Not a candidate for this pick: tried already, or failing.
  bool passed_over(const Backend& backend, std::span<const Backend* const> exclude) const noexcept;

  BackendState initial_;
  mutable std::mutex write_mutex_;  // serialises writers only; readers never take it
  std::atomic<std::shared_ptr<const BackendSet>> set_{std::make_shared<const BackendSet>()};
  std::size_t next_index_ = 0;
  std::atomic<std::uint64_t> rr_{0};
  int passive_limit_ = 0;
  bool least_inflight_ = false;
};

}  // namespace infergate::discovery
