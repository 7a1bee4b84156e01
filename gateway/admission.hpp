// limits.max_inflight_per_backend: each backend takes at most that many requests at once, and a
// request that finds every backend full waits in one gateway-wide queue (limits.max_queued,
// timeouts.queue) for a place. A place given back goes straight to the request that has waited
// longest, on whichever worker it is, so the queue is served in order and a backend never holds
// more than its limit. With no limit (0) none of this runs: requests only count their places.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <chrono>
#include <list>
#include <memory>
#include <mutex>
#include <span>

#include "discovery/registry.hpp"
#include "gateway/net.hpp"

namespace infergate::gateway {

class Admission {
 public:
  // A request waiting for a place. Shared with the queue: a place may be granted from another
  // worker's thread, which then wakes the waiter's timer on the waiter's own thread.
  struct Waiter {
    Waiter(const net::any_io_executor& executor, std::span<const discovery::Backend* const> tried,
           std::chrono::steady_clock::time_point first_queued)
        : timer(executor), exclude(tried), since(first_queued) {}
    net::steady_timer timer;
    std::span<const discovery::Backend* const> exclude;  // backends the request tried already
    // When the request first queued: a retry that queues again keeps its turn.
    std::chrono::steady_clock::time_point since;
    // Under the queue's lock. Held, not pointed at: the backend may be one added after the
    // request came (absent from the snapshots it holds), and removed while it is served.
    std::shared_ptr<discovery::Backend> granted;
    bool in_queue = false;                                       // under the queue's lock
    std::list<std::weak_ptr<Waiter>>::iterator position;         // while in_queue
  };

  Admission(discovery::Registry& registry, int per_backend, std::size_t max_queued)
      : registry_(registry), per_backend_(per_backend), max_queued_(max_queued) {}
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  bool limited() const noexcept { return per_backend_ > 0; }
  int per_backend() const noexcept { return per_backend_; }
  std::size_t max_queued() const noexcept { return max_queued_; }
  std::size_t queued() const noexcept { return waiting_.load(std::memory_order_relaxed); }

  // Gives back one of `backend`'s in-flight places: to the request that has waited longest and
  // may use this backend, if there is one, else to the backend.
  void give_back(discovery::Backend& backend);
  // Queues `waiter` in the order of `since` (behind every request that queued before it); false
  // when limits.max_queued are waiting already.
  bool enqueue(const std::shared_ptr<Waiter>& waiter);
  // The backend a place was granted on, if one was: `waiter` is out of the queue then.
  std::shared_ptr<discovery::Backend> leave_if_granted(Waiter& waiter);
  // Takes `waiter` out of the queue. Returns the backend a place was granted on meanwhile, if
  // any: the caller holds that place (and gives it back if it does not use it).
  std::shared_ptr<discovery::Backend> leave(Waiter& waiter);

  std::atomic<std::uint64_t> rejected_full{0};     // answered 429: the queue was full
  std::atomic<std::uint64_t> rejected_timeout{0};  // answered 503: no place within timeouts.queue

 private:
  discovery::Registry& registry_;
  const int per_backend_;
  const std::size_t max_queued_;
  std::mutex mutex_;
  // Oldest first. Weak: a waiter lives in its request's coroutine, and a worker torn down with
  // requests still queued (the process exiting) takes them with it.
  std::list<std::weak_ptr<Waiter>> queue_;
  std::atomic<std::size_t> waiting_{0};        // queue_.size(), read without the lock
};

// One of a backend's in-flight places, held for an attempt: taken here unless the pick took it
// (with a limit), given back when the attempt ends.
class BackendPlace {
 public:
  BackendPlace(Admission& admission, discovery::Backend& backend, bool taken) noexcept
      : admission_(admission), backend_(backend) {
    if (!taken) backend_.stats.inflight.fetch_add(1, std::memory_order_relaxed);
  }
  ~BackendPlace() { admission_.give_back(backend_); }
  BackendPlace(const BackendPlace&) = delete;
  BackendPlace& operator=(const BackendPlace&) = delete;

 private:
  Admission& admission_;
  discovery::Backend& backend_;
};

}  // namespace infergate::gateway
