// Human-friendly durations ("250ms", "2s", "5m", "1h"; a bare number is seconds) and sizes
// ("64KiB", "64MiB", a bare number is bytes), shared by the config file, env and flags.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace infergate::config {

// nullopt when the text is not a valid non-negative duration.
std::optional<std::chrono::milliseconds> parse_duration(std::string_view text);
// nullopt when the text is not a valid size.
std::optional<std::uint64_t> parse_size(std::string_view text);

std::string format_duration(std::chrono::milliseconds d);
std::string format_size(std::uint64_t bytes);

}  // namespace infergate::config
