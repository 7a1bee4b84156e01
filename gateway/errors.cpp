#include "gateway/errors.hpp"

#include <nlohmann/json.hpp>

namespace infergate::gateway {

std::string error_body(std::string_view message, std::string_view type, int status) {
  // Messages quote what the client sent (a URL, an id): a 30 MB URL is not echoed back whole.
  constexpr std::size_t kMaxMessage = 2048;
  std::string shortened;
  if (message.size() > kMaxMessage) {
    shortened.assign(message.substr(0, kMaxMessage)).append("... (" + std::to_string(message.size()) + " bytes in all)");
    message = shortened;
  }
  nlohmann::json body = {
      {"error", {{"message", message}, {"type", type}, {"code", status}}},
  };
  // Replace rather than throw on bytes that are not UTF-8 (they may come from a client's path).
  return body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string_view error_type_for(int status) {
  switch (status) {
    case 400:
    case 404:
    case 405:
    case 413:
    case 431:
    case 501: return "invalid_request_error";  // a method the gateway does not support (CONNECT)
    case 401:
    case 403: return "authentication_error";
    case 429: return "rate_limit_error";
    case 502: return "bad_gateway";
    case 503: return "service_unavailable";
    case 504: return "timeout";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

}  // namespace infergate::gateway
