// Keep-alive connections to backends, one pool per worker thread (no locks): bounded idle
// connections per backend, evicted after an idle timeout or when the backend closed them.
#pragma once

#include <array>
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
  // connection so that the relay's coroutine frame stays small enough for Asio's frame cache.
  std::array<char, 16 * 1024> relay_buffer;
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
