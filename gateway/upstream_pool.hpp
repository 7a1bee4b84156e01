// Keep-alive connections to backends, one pool per worker thread (no locks): bounded idle
// connections per backend, evicted after an idle timeout or when the backend closed them.
#pragma once

#include <array>
#include <chrono>
#include <string>
#include <string_view>
#include <cstddef>
#include <memory>
#include <vector>

#include "discovery/http1.hpp"
#include "discovery/timed_socket.hpp"
#include "gateway/net.hpp"

namespace infergate::gateway {

struct UpstreamConnection {
  UpstreamConnection(DeadlineList& deadlines, const net::any_io_executor& ex) : sock(deadlines, ex) {}
  TimedSocket sock;
  // Response bytes: the head is parsed here and body bytes are relayed from here.
  http1::ByteBuffer buffer;
  http1::Head head;
  std::chrono::steady_clock::time_point idle_since{};
  // The X-Request-IDs of the last requests answered on this connection (a ring): an answer
  // that carries one of them again was not asked for (see relay_response).
  static constexpr std::size_t kIdsKept = 4;
  std::array<std::string, kIdsKept> answered_ids;
  std::size_t answered_count = 0;
  bool answered_before(std::string_view id) const noexcept {
    if (id.empty()) return false;
    for (const auto& kept : answered_ids) {
      if (kept == id) return true;
    }
    return false;
  }
  void remember_answered(std::string_view id) { answered_ids[answered_count++ % kIdsKept].assign(id); }
  // The backend echoed a request's X-Request-ID exactly on this connection: from then on an
  // answer here that does not carry its request's id is out of step.
  bool echoes_ids = false;
};

class UpstreamPool {
 public:
  UpstreamPool(std::size_t max_idle_per_backend, std::chrono::milliseconds idle_timeout)
      : max_idle_(max_idle_per_backend), idle_timeout_(idle_timeout) {}

  // A parked connection to the backend that still looks open, or nullptr.
  std::unique_ptr<UpstreamConnection> acquire(std::size_t backend_index);
  // Parks a connection whose last response completed cleanly; closes it when the pool is full.
  void release(std::size_t backend_index, std::unique_ptr<UpstreamConnection> connection);
  // Closes connections idle for longer than the idle timeout, and those to backends that are
  // no longer present (`present` is indexed by backend index; past its end: not present).
  void evict_expired(std::chrono::steady_clock::time_point now, const std::vector<bool>& present);
  // Closes everything (shutdown, or a backend removed).
  void clear();
  void clear(std::size_t backend_index);
  std::size_t idle_count() const;

 private:
  std::size_t max_idle_;
  std::chrono::milliseconds idle_timeout_;
  std::vector<std::vector<std::unique_ptr<UpstreamConnection>>> idle_;  // by backend index
};

}  // namespace infergate::gateway
