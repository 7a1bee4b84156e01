// Keep-alive connections to backends, one pool per worker thread (no locks): bounded idle
// connections per backend, evicted after an idle timeout or when the backend closed them.
#pragma once

#include <span>
#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "gateway/net.hpp"

namespace infergate::gateway {

struct UpstreamConnection {
  explicit UpstreamConnection(net::any_io_executor ex) : stream(std::move(ex)) {}
  beast::tcp_stream stream;
  beast::flat_buffer buffer;
  // Response body bytes pass through here on their way to the client. It lives with the
  // connection (the relay's coroutine frame stays small) and is sized per response: SSE events
  // are small and 10,000 open streams must not hold 16 KiB each.
  std::unique_ptr<char[]> relay_buffer;
  std::size_t relay_size = 0;
  std::span<char> relay_space(std::size_t size) {
    if (relay_size != size) {
      relay_buffer = std::make_unique_for_overwrite<char[]>(size);
      relay_size = size;
    }
    return {relay_buffer.get(), size};
  }
  std::chrono::steady_clock::time_point idle_since{};
};

class UpstreamPool {
 public:
  UpstreamPool(std::size_t max_idle_per_backend, std::chrono::milliseconds idle_timeout)
      : max_idle_(max_idle_per_backend), idle_timeout_(idle_timeout) {}

  // A parked connection to the backend that still looks open, or nullptr.
  std::unique_ptr<UpstreamConnection> acquire(std::size_t backend_index);
  // Parks a connection whose last response completed cleanly; closes it when the pool is full.
  void release(std::size_t backend_index, std::unique_ptr<UpstreamConnection> connection);
  // Closes connections idle for longer than the idle timeout.
  void evict_expired(std::chrono::steady_clock::time_point now);
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
