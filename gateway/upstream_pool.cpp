#include "gateway/upstream_pool.hpp"

#include <sys/socket.h>

#include <cerrno>

namespace infergate::gateway {
namespace {

// A parked connection the backend has closed (or sent unexpected bytes on) is useless: find
// out with one non-blocking peek instead of failing the next request on it.
bool still_open(UpstreamConnection& c) {
  auto& socket = c.sock.socket();
  if (!socket.is_open()) return false;
  char byte = 0;
  ssize_t n = ::recv(socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
  return false;  // 0: orderly close; >0: bytes nobody asked for
}

}  // namespace

std::unique_ptr<UpstreamConnection> UpstreamPool::acquire(std::size_t backend_index) {
  if (backend_index >= idle_.size()) return nullptr;
  auto& list = idle_[backend_index];
  const auto now = std::chrono::steady_clock::now();
  while (!list.empty()) {
    auto c = std::move(list.back());
    list.pop_back();
    if (now - c->idle_since >= idle_timeout_) continue;
    // Peeked every time, however short the wait: a backend that sent more than it framed (a body
    // after HEAD, bytes past Content-Length) may have done so in a later segment, and those bytes
    // would be read as the next request's response.
    if (still_open(*c)) return c;
  }
  return nullptr;
}

void UpstreamPool::release(std::size_t backend_index, std::unique_ptr<UpstreamConnection> c) {
  if (max_idle_ == 0 || !c->sock.socket().is_open() || c->sock.timed_out()) return;
  if (backend_index >= idle_.size()) idle_.resize(backend_index + 1);
  auto& list = idle_[backend_index];
  if (list.size() >= max_idle_) return;  // dropping closes it
  c->buffer.clear();
  if (c->buffer.capacity() > 16 * 1024) c->buffer.release();  // after a large response
  c->idle_since = std::chrono::steady_clock::now();
  list.push_back(std::move(c));
}

void UpstreamPool::evict_expired(std::chrono::steady_clock::time_point now, const std::vector<bool>& present) {
  for (std::size_t i = 0; i < idle_.size(); ++i) {
    if (i >= present.size() || !present[i]) {
      idle_[i].clear();  // removed through the admin API: nothing will use these again
      continue;
    }
    std::erase_if(idle_[i], [&](const auto& c) { return now - c->idle_since >= idle_timeout_; });
  }
}

void UpstreamPool::clear() { idle_.clear(); }

void UpstreamPool::clear(std::size_t backend_index) {
  if (backend_index < idle_.size()) idle_[backend_index].clear();
}

std::size_t UpstreamPool::idle_count() const {
  std::size_t n = 0;
  for (const auto& list : idle_) n += list.size();
  return n;
}

}  // namespace infergate::gateway
