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

}  // namespace infergate::gateway
