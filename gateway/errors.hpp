// Errors the gateway itself answers with, in the OpenAI shape clients already parse:
// {"error":{"message":...,"type":...,"code":...}}.
#pragma once

#include <string>
#include <string_view>

namespace infergate::gateway {

// `type` follows OpenAI's names: invalid_request_error, rate_limit_error, server_error, ...
std::string error_body(std::string_view message, std::string_view type, int status);

// The OpenAI error type that goes with an HTTP status the gateway returns.
std::string_view error_type_for(int status);

}  // namespace infergate::gateway
