// Keep-alive connections to backends, one pool per worker thread (no locks): bounded idle
// connections per backend, evicted after an idle timeout or when the backend closed them.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <cstddef>
#include <functional>
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
  // The X-Request-IDs of the last requests answered on this connection, hashed (a ring): an
  // answer that carries one of them again was not asked for (see relay_response).
  static constexpr std::size_t kIdsKept = 64;
  std::array<std::uint64_t, kIdsKept> sent_ids{};
  std::size_t sent_count = 0;
  static std::uint64_t id_hash(std::string_view id) noexcept { return std::hash<std::string_view>{}(id); }
  bool sent_before(std::string_view id) const noexcept {
    if (id.empty()) return false;
    const auto h = id_hash(id);
    const auto n = std::min(sent_count, kIdsKept);
    for (std::size_t i = 0; i < n; ++i) {
      if (sent_ids[i] == h) return true;
    }
    return false;
  }
  void remember_sent(std::string_view id) noexcept { sent_ids[sent_count++ % kIdsKept] = id_hash(id); }
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
