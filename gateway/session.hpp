// A client connection: reads requests (keep-alive, pipelining), answers the gateway's own
// endpoints and proxies everything else to a backend.
#pragma once

#include "gateway/net.hpp"
#include "gateway/worker.hpp"

namespace infergate::gateway {

enum class Listener { kGateway, kMetricsOnly };

// Runs until the client closes, a protocol error, or shutdown. Never throws. A metrics-only
// listener (metrics.listen) answers /metrics and /health and nothing else. `slot` is the
// connection's place among limits.max_client_connections (none for the metrics listener).
// `answered_before`: the connection carried a request already (a stream's relay hands it back),
// so its wait for the next one is timeouts.client_idle, not a new connection's client_header.
net::awaitable<void> run_client_session(Worker* worker, tcp::socket socket, Listener listener, ConnectionSlot slot,
                                        bool answered_before = false);

}  // namespace infergate::gateway
