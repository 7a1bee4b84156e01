#include "config/units.hpp"

#include "slurm/hostlist.hpp"

#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <utility>

namespace infergate::config {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Splits "250ms" into the number 250 and the unit "ms". The number may have a fraction.
std::optional<std::pair<double, std::string_view>> split_number(std::string_view text) {
  text = trim(text);
  std::size_t i = 0;
  while (i < text.size() && ((text[i] >= '0' && text[i] <= '9') || text[i] == '.')) ++i;
  if (i == 0) return std::nullopt;
  double value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + i, value);
  if (ec != std::errc{} || ptr != text.data() + i || !std::isfinite(value) || value < 0) {
    return std::nullopt;
  }
  return std::pair{value, trim(text.substr(i))};
}

}  // namespace

namespace {

enum class DurationCheck { kOk, kInvalid, kTooLong };

// Shared by parse_duration and duration_error so the two can never disagree.
DurationCheck check_duration(std::string_view text, std::chrono::milliseconds& out) {
  auto parsed = split_number(text);
  if (!parsed) return DurationCheck::kInvalid;
  auto [value, unit] = *parsed;
  double ms_per_unit = 0;
  if (unit.empty() || unit == "s") {
    ms_per_unit = 1000;
  } else if (unit == "ms") {
    ms_per_unit = 1;
  } else if (unit == "m" || unit == "min") {
    ms_per_unit = 60'000;
  } else if (unit == "h") {
    ms_per_unit = 3'600'000;
  } else {
    return DurationCheck::kInvalid;
  }
  double ms = std::round(value * ms_per_unit);
  // Compared as a double before converting: the product may not fit an int64 at all.
  if (ms > static_cast<double>(kMaxDuration.count())) return DurationCheck::kTooLong;
  out = std::chrono::milliseconds{static_cast<std::int64_t>(ms)};
  return DurationCheck::kOk;
}

}  // namespace

std::optional<std::chrono::milliseconds> parse_duration(std::string_view text) {
  std::chrono::milliseconds d{};
  if (check_duration(text, d) != DurationCheck::kOk) return std::nullopt;
  return d;
}

std::string duration_error(std::string_view text) {
  std::chrono::milliseconds d{};
  switch (check_duration(text, d)) {
    case DurationCheck::kOk:
      return {};
    case DurationCheck::kInvalid:
      return "invalid duration " + slurm::quoted_for_message(text) + " (expected e.g. 250ms, 2s, 5m, 1h)";
    case DurationCheck::kTooLong:
      return "duration " + slurm::quoted_for_message(text) + " is longer than the maximum of " +
             format_duration(kMaxDuration) + " (10 years)";
  }
  return {};
}

std::optional<std::uint64_t> parse_size(std::string_view text) {
  auto parsed = split_number(text);
  if (!parsed) return std::nullopt;
  auto [value, unit] = *parsed;
  static constexpr std::array<std::pair<std::string_view, double>, 9> kUnits{{
      {"", 1.0},
      {"B", 1.0},
      {"KiB", 1024.0},
      {"MiB", 1024.0 * 1024},
      {"GiB", 1024.0 * 1024 * 1024},
      {"KB", 1000.0},
      {"MB", 1e6},
      {"GB", 1e9},
      {"k", 1000.0},
  }};
  for (const auto& [name, factor] : kUnits) {
    if (unit == name) {
      double bytes = value * factor;
      if (bytes > 1e18) return std::nullopt;
      // A fraction of a unit is fine (1.5MiB) as long as it comes to whole bytes: 1.5 bytes is
      // a mistake, not 2. (The slack absorbs the decimal rounding of 1.1MB and the like.)
      if (std::abs(bytes - std::round(bytes)) > 1e-6) return std::nullopt;
      return static_cast<std::uint64_t>(std::llround(bytes));
    }
  }
  return std::nullopt;
}

std::string format_duration(std::chrono::milliseconds d) {
  auto ms = d.count();
  if (ms != 0 && ms % 3'600'000 == 0) return std::to_string(ms / 3'600'000) + "h";
  if (ms != 0 && ms % 60'000 == 0) return std::to_string(ms / 60'000) + "m";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

std::string format_size(std::uint64_t bytes) {
  if (bytes != 0 && bytes % (1024ULL * 1024 * 1024) == 0) {
    return std::to_string(bytes / (1024ULL * 1024 * 1024)) + "GiB";
  }
  if (bytes != 0 && bytes % (1024ULL * 1024) == 0) return std::to_string(bytes / (1024ULL * 1024)) + "MiB";
  if (bytes != 0 && bytes % 1024ULL == 0) return std::to_string(bytes / 1024ULL) + "KiB";
  return std::to_string(bytes);
}

}  // namespace infergate::config
