#include "gateway/retry_policy.hpp"

#include <algorithm>

namespace infergate::gateway {

std::string_view to_string(AttemptFailure failure) {
  switch (failure) {
    case AttemptFailure::kConnectRefused: return "connect failed";
    case AttemptFailure::kConnectTimeout: return "connect timeout";
    case AttemptFailure::kResetBeforeResponse: return "connection reset before response";
    case AttemptFailure::kFirstByteTimeout: return "first-byte timeout";
    case AttemptFailure::kRetryableStatus: return "retryable status";
  }
  return "failure";
}

std::chrono::milliseconds RetryPolicy::backoff(int retry_number, double unit_random) const noexcept {
  if (retry_number <= 0 || backoff_base_.count() == 0) return std::chrono::milliseconds{0};
  auto exp = backoff_base_.count();
  for (int i = 1; i < retry_number && exp < backoff_max_.count(); ++i) exp *= 2;
  exp = std::min<std::int64_t>(exp, backoff_max_.count());
  unit_random = std::clamp(unit_random, 0.0, 1.0);
  auto half = exp / 2;
  return std::chrono::milliseconds{half + static_cast<std::int64_t>(static_cast<double>(exp - half) * unit_random)};
}

std::chrono::seconds RetryPolicy::retry_after(std::string_view value) noexcept {
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
  while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
  if (value.empty()) return std::chrono::seconds{0};
  std::int64_t seconds = 0;
  for (char ch : value) {
    if (ch < '0' || ch > '9') return std::chrono::seconds{0};
    seconds = std::min<std::int64_t>(seconds * 10 + (ch - '0'), kMaxRetryAfter.count());
  }
  return std::chrono::seconds{seconds};
}

}  // namespace infergate::gateway
