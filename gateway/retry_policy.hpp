// When a failed attempt may be tried again on another backend, and how long to wait first.
// Pure logic: the proxy reports what happened, the policy decides.
#pragma once

#include <chrono>
#include <cstdint>
#include <string_view>

namespace infergate::gateway {

enum class AttemptFailure {
  kConnectRefused,   // connect failed (refused, unreachable, DNS)
  kConnectTimeout,
  kResetBeforeResponse,  // the connection broke before any response byte
  kFirstByteTimeout,
  kRetryableStatus,  // the backend answered 502 or 503
};
std::string_view to_string(AttemptFailure failure);

class RetryPolicy {
 public:
  RetryPolicy(int max_retries, std::chrono::milliseconds backoff_base,
              std::chrono::milliseconds backoff_max)
      : max_retries_(max_retries), backoff_base_(backoff_base), backoff_max_(backoff_max) {}

  // `attempt` counts from 0 (the first try). Never called once bytes reached the client.
  bool should_retry(int attempt) const noexcept { return attempt < max_retries_; }

  // Exponential backoff with "equal jitter": half fixed, half random, so retries after a
  // shared failure spread out. `unit_random` is in [0, 1).
  std::chrono::milliseconds backoff(int retry_number, double unit_random) const noexcept;

  static bool is_retryable_status(unsigned status) noexcept { return status == 502 || status == 503; }

  // A backend's Retry-After in delta-seconds, at most kMaxRetryAfter; 0 when absent, malformed
  // or an HTTP date (which would need the backend's clock to be right).
  static constexpr std::chrono::seconds kMaxRetryAfter{3600};
  static std::chrono::seconds retry_after(std::string_view value) noexcept;

 private:
  int max_retries_;
  std::chrono::milliseconds backoff_base_;
  std::chrono::milliseconds backoff_max_;
};

}  // namespace infergate::gateway
