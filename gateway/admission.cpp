#include "gateway/admission.hpp"

#include <algorithm>

#include <boost/container/small_vector.hpp>

namespace infergate::gateway {

// The count of waiting requests and the backends' in-flight counts are read and written
// sequentially consistently, in opposite orders: a request queues, then looks for room again; a
// place is given back, then the queue is looked at. Either the request sees the room or the
// one giving the place back sees the request, so no request waits while a place is free.
void Admission::give_back(discovery::Backend& backend) {
  if (!limited()) {
    backend.stats.inflight.fetch_sub(1, std::memory_order_relaxed);
    return;
  }
  backend.stats.inflight.fetch_sub(1);
  if (waiting_.load() == 0) return;
  boost::container::small_vector<std::shared_ptr<Waiter>, 2> woken;
  {
    std::lock_guard lock(mutex_);
    if (!registry_.routable_now(backend)) return;  // its place waits for it to come back
    for (auto it = queue_.begin(); it != queue_.end();) {
      auto waiter = it->lock();
      if (!waiter) {  // only while the process exits
        it = queue_.erase(it);
        waiting_.fetch_sub(1);
        continue;
      }
      if (std::find(waiter->exclude.begin(), waiter->exclude.end(), &backend) != waiter->exclude.end()) {
        ++it;  // a retry goes to another backend than the ones it tried
        continue;
      }
      if (!discovery::Registry::take_place(backend, per_backend_)) break;
      waiter->granted = backend.shared_from_this();
      waiter->in_queue = false;
      it = queue_.erase(it);
      waiting_.fetch_sub(1);
      woken.push_back(std::move(waiter));
    }
  }
  // Timers are used on their own worker's thread only, and destroyed there: the last reference
  // goes with the posted wake-up or with the waiter's request.
  for (auto& waiter : woken) {
    auto executor = waiter->timer.get_executor();
    net::post(executor, [waiter = std::move(waiter)] { waiter->timer.cancel(); });
  }
}

bool Admission::enqueue(const std::shared_ptr<Waiter>& waiter) {
  std::lock_guard lock(mutex_);
  if (queue_.size() >= max_queued_) return false;
  // Behind every request that queued first: from the back, as new arrivals are the most.
  auto at = queue_.end();
  while (at != queue_.begin()) {
    auto before = std::prev(at);
    auto other = before->lock();
    if (other && other->since <= waiter->since) break;
    at = before;
  }
  waiter->position = queue_.insert(at, waiter);
  waiter->in_queue = true;
  waiting_.fetch_add(1);
  return true;
}

std::shared_ptr<discovery::Backend> Admission::leave_if_granted(Waiter& waiter) {
  std::lock_guard lock(mutex_);
  return std::exchange(waiter.granted, nullptr);
}

std::shared_ptr<discovery::Backend> Admission::leave(Waiter& waiter) {
  std::lock_guard lock(mutex_);
  if (waiter.in_queue) {
    queue_.erase(waiter.position);
    waiting_.fetch_sub(1);
    waiter.in_queue = false;
  }
  return std::exchange(waiter.granted, nullptr);
}

}  // namespace infergate::gateway
