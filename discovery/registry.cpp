#include "discovery/registry.hpp"

#include <algorithm>

namespace infergate::discovery {

std::string_view to_string(BackendState state) {
  switch (state) {
    case BackendState::kStarting: return "starting";
    case BackendState::kHealthy: return "healthy";
    case BackendState::kUnhealthy: return "unhealthy";
    case BackendState::kEjected: return "ejected";
    case BackendState::kDraining: return "draining";
    case BackendState::kRemoved: return "removed";
  }
  return "unknown";
}

void DurationHistogram::observe(std::chrono::nanoseconds d) noexcept {
  const double seconds = std::chrono::duration<double>(d).count();
  std::size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<std::uint64_t>(std::max<std::int64_t>(d.count(), 0)), std::memory_order_relaxed);
}

std::array<std::uint64_t, DurationHistogram::kBounds.size() + 1> DurationHistogram::cumulative()
    const noexcept {
  std::array<std::uint64_t, kBounds.size() + 1> out{};
  std::uint64_t running = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

double DurationHistogram::sum_seconds() const noexcept {
  return static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / 1e9;
}

std::uint64_t DurationHistogram::count() const noexcept { return cumulative().back(); }

Backend::ProbeRecord Backend::last_probe() const {
  std::lock_guard lock(detail_mutex_);
  return last_probe_;
}
void Backend::set_last_probe(ProbeRecord record) {
  std::lock_guard lock(detail_mutex_);
  last_probe_ = std::move(record);
}
std::string Backend::last_error() const {
  std::lock_guard lock(detail_mutex_);
  return last_error_;
}
void Backend::set_last_error(std::string error) {
  std::lock_guard lock(detail_mutex_);
  last_error_ = std::move(error);
}
std::vector<std::string> Backend::models() const {
  std::lock_guard lock(detail_mutex_);
  std::vector<std::string> ids;
  ids.reserve(models_.size());
  for (const auto& m : models_) ids.push_back(m.id);
  return ids;
}
std::vector<Backend::Model> Backend::model_objects() const {
  std::lock_guard lock(detail_mutex_);
  return models_;
}
void Backend::set_models(std::vector<Model> models) {
  std::lock_guard lock(detail_mutex_);
  models_ = std::move(models);
}

void Registry::publish_locked(std::vector<std::shared_ptr<Backend>> all) {
  auto set = std::make_shared<BackendSet>();
  set->all = std::move(all);
  for (const auto& b : set->all) {
    if (b->state() == BackendState::kHealthy) set->routable.push_back(b.get());
  }
  set_.store(std::move(set), std::memory_order_release);
}

std::shared_ptr<Backend> Registry::add(BackendInfo info) {
  std::lock_guard lock(write_mutex_);
  auto current = set_.load(std::memory_order_acquire);
  for (const auto& b : current->all) {
    if (b->info().id == info.id) return b;
  }
  auto backend = std::make_shared<Backend>(std::move(info), next_index_++, initial_);
  auto all = current->all;
  all.push_back(backend);
  publish_locked(std::move(all));
  return backend;
}

bool Registry::remove(std::string_view id) {
  std::lock_guard lock(write_mutex_);
  auto current = set_.load(std::memory_order_acquire);
  auto all = current->all;
  auto it = std::find_if(all.begin(), all.end(), [&](const auto& b) { return b->info().id == id; });
  if (it == all.end()) return false;
  (*it)->set_state(BackendState::kRemoved);
  all.erase(it);
  publish_locked(std::move(all));
  return true;
}

std::shared_ptr<Backend> Registry::find(std::string_view id) const {
  auto current = snapshot();
  for (const auto& b : current->all) {
    if (b->info().id == id) return b;
  }
  return nullptr;
}

void Registry::republish() {
  std::lock_guard lock(write_mutex_);
  publish_locked(set_.load(std::memory_order_acquire)->all);
}

Backend* Registry::pick(const BackendSet& set, std::span<const Backend* const> exclude, int room_limit, bool* full) {
  const auto n = set.routable.size();
  if (n == 0) return nullptr;
  // Only a request's first attempt moves the rotation on: if retries did too, with an even
  // number of backends every first attempt would land on the same one whenever requests fail.
  auto start = exclude.empty() ? rr_.fetch_add(1, std::memory_order_relaxed) : rr_.load(std::memory_order_relaxed);
  if (least_inflight_) return pick_least(set, exclude, start, room_limit, full);
  for (std::size_t i = 0; i < n; ++i) {
    Backend* candidate = set.routable[(start + i) % n];
    if (passed_over(*candidate, exclude)) continue;
    if (room_limit > 0 && !take_place(*candidate, room_limit)) {
      if (full != nullptr) *full = true;
      continue;
    }
    return candidate;
  }
  return nullptr;
}

Backend* Registry::pick_least(const BackendSet& set, std::span<const Backend* const> exclude, std::uint64_t start,
                              int room_limit, bool* full) {
  const auto n = set.routable.size();
  // Another thread may take the last place on the least busy backend between the look and the
  // take: look again (each failed take means some request got a place, so this ends).
  for (;;) {
    Backend* least = nullptr;
    std::int64_t fewest = 0;
    for (std::size_t i = 0; i < n; ++i) {
      Backend* candidate = set.routable[(start + i) % n];
      if (passed_over(*candidate, exclude)) continue;
      const auto inflight = candidate->stats.inflight.load(std::memory_order_relaxed);
      if (room_limit > 0 && inflight >= room_limit) {
        if (full != nullptr) *full = true;
        continue;
      }
      if (least == nullptr || inflight < fewest) {
        least = candidate;
        fewest = inflight;
      }
    }
    if (least == nullptr || room_limit <= 0 || take_place(*least, room_limit)) return least;
  }
}

bool Registry::take_place(Backend& backend, int room_limit) noexcept {
  // Sequentially consistent, as the queue's count of waiting requests is (see Admission).
  auto n = backend.stats.inflight.load();
  do {
    if (n >= room_limit) return false;
  } while (!backend.stats.inflight.compare_exchange_weak(n, n + 1));
  return true;
}

bool Registry::failing(const Backend& backend) const noexcept {
  return passive_limit_ > 0 && backend.stats.consecutive_failures.load(std::memory_order_relaxed) >= passive_limit_;
}

bool Registry::passed_over(const Backend& backend, std::span<const Backend* const> exclude) const noexcept {
  return std::find(exclude.begin(), exclude.end(), &backend) != exclude.end() || failing(backend);
}

bool Registry::routable_now(const Backend& backend) const noexcept {
  return backend.state() == BackendState::kHealthy && !failing(backend);
}

}  // namespace infergate::discovery
