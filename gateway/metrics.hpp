// /metrics: the Prometheus text exposition of per-backend and gateway-wide counters. The
// request path only bumps atomics; a scrape reads them into prometheus-cpp metric families.
#pragma once

#include <string>

#include "gateway/gateway_state.hpp"

namespace infergate::gateway {

std::string render_metrics(const GatewayState& state);

}  // namespace infergate::gateway
