// Human-friendly durations ("250ms", "2s", "5m", "1h"; a bare number is seconds) and sizes
// ("64KiB", "64MiB", a bare number is bytes), shared by the config file, env and flags.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace infergate::config {

// The longest duration any setting accepts: 10 years (of 365 days). Deadlines are steady_clock
// time points in nanoseconds (int64: about 292 years), so a larger value such as
// `timeouts.idle=9999999999` (317 years) would wrap into the past and fire at once. Ten years
// is far beyond any real timeout yet leaves ample headroom for `now + d` and for doubling backoffs.
inline constexpr std::chrono::milliseconds kMaxDuration = std::chrono::hours{24 * 365 * 10};

// nullopt when the text is not a valid non-negative duration or exceeds kMaxDuration.
std::optional<std::chrono::milliseconds> parse_duration(std::string_view text);
// Why parse_duration rejects `text`, as one line for a config error ("invalid duration ..." or
// "duration ... is longer than the maximum ..."); empty when it accepts it.
std::string duration_error(std::string_view text);
// nullopt when the text is not a valid size.
std::optional<std::uint64_t> parse_size(std::string_view text);

std::string format_duration(std::chrono::milliseconds d);
std::string format_size(std::uint64_t bytes);

}  // namespace infergate::config
