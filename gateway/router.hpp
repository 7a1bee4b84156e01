// The endpoints the gateway owns (/health, /ready, /metrics, /v1/models, /admin/*, the status
// page) and the decision to proxy everything else. No sockets: the session does the I/O.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "gateway/gateway_state.hpp"

namespace infergate::gateway {

// An answer the gateway makes itself.
struct LocalResponse {
  unsigned status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
};

LocalResponse error_response(unsigned status, std::string_view message);

struct RequestView {
  std::string_view method;
  std::string_view target;
  std::string_view authorization;
  std::string_view body;
};

struct ProxyRequest {};
struct BroadcastRequest {
  std::string method;
  std::string path;
  std::string body;
};
using RouteDecision = std::variant<ProxyRequest, LocalResponse, BroadcastRequest>;

RouteDecision route(GatewayState& state, const RequestView& request);

// One backend's answer to a broadcast, and the JSON the client gets for all of them.
struct BroadcastResult {
  std::string backend;
  unsigned status = 0;  // 0: no response
  std::string body;
  std::string error;
  std::string skipped;  // not sent: the backend's state ("draining", "starting", ...)
};
LocalResponse broadcast_response(const std::vector<BroadcastResult>& results);

// The JSON object /admin/backends lists for one backend.
std::string backends_json(const GatewayState& state);

// The backends not taking traffic, by state, for messages: " (2 draining, 1 starting)", or ""
// when every backend is healthy.
std::string unhealthy_summary(const discovery::BackendSet& set);

}  // namespace infergate::gateway
