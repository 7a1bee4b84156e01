// One worker thread's world: its io_context, its upstream pool and its resolver cache. A client
// connection lives on one worker from accept to close, so none of this needs a lock.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "discovery/timed_socket.hpp"
#include "gateway/gateway_state.hpp"
#include "gateway/net.hpp"
#include "gateway/upstream_pool.hpp"

namespace infergate::gateway {

struct Worker {
  Worker(GatewayState& shared, std::size_t worker_index)
      : state(&shared),
        index(worker_index),
        // Every socket of a worker is used on its thread only: no locking around socket I/O.
        io(BOOST_ASIO_CONCURRENCY_HINT_UNSAFE_IO),
        pool(static_cast<std::size_t>(shared.config.limits.upstream_idle_per_backend),
             shared.config.limits.upstream_idle_timeout),
        rng(std::random_device{}() + static_cast<unsigned>(worker_index)),
        request_id_prefix(make_request_id_prefix(worker_index, static_cast<std::uint32_t>(rng()))) {}

  // "ig-<worker>-<random>-": the ids this worker gives requests are this and a counter.
  static std::string make_request_id_prefix(std::size_t worker_index, std::uint32_t nonce) {
    char prefix[48];
    std::snprintf(prefix, sizeof prefix, "ig-%zx-%08x-", worker_index, static_cast<unsigned>(nonce));
    return prefix;
  }

  GatewayState* state;
  std::size_t index;
  // Before `io` and `pool`: the sockets they own unlink themselves from it when destroyed.
  DeadlineList deadlines;
  // Run by this worker's thread alone (other threads only post to it): the hint lets Asio queue
  // this thread's own completions without taking the scheduler's lock.
  net::io_context io{1};
  UpstreamPool pool;
  std::minstd_rand rng;
  // Resolved addresses per backend index; dropped when a connect to them fails.
  std::unordered_map<std::size_t, std::vector<tcp::endpoint>> resolved;
  // Unique across workers and (by its random part) restarts: an answer on this worker's
  // connections that carries another of these ids belongs to another request.
  std::string request_id_prefix;
  std::uint64_t request_counter = 0;
  // Retry backoffs and name lookups under way (their timers), which a shutdown's deadline ends.
  std::vector<net::steady_timer*> waits;
};

}  // namespace infergate::gateway
