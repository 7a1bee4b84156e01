// Slurm hostlist expansion ("gpu[001-004,010],r[1-2]n[01-02]") without scontrol, plus an
// optional scontrol fallback for syntax we do not understand natively.
#pragma once

#include <chrono>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace infergate::slurm {

// A malformed hostlist. what() reads "hostlist 'LIST': position N: PROBLEM".
class HostlistError : public std::runtime_error {
 public:
  HostlistError(std::string_view list, std::size_t position, std::string_view problem);
  std::size_t position() const noexcept { return position_; }

 private:
  std::size_t position_;
};

inline constexpr std::size_t kDefaultMaxHosts = 100'000;

// Expands a hostlist in the order `scontrol show hostnames` prints it. Throws HostlistError.
std::vector<std::string> expand_hostlist(std::string_view list,
                                         std::size_t max_hosts = kDefaultMaxHosts);

// Runs `scontrol show hostnames LIST` with a deadline. Throws std::runtime_error naming the
// command and the failure (not found, timed out, non-zero exit, empty output).
std::vector<std::string> scontrol_hostnames(std::string_view list,
                                            std::chrono::milliseconds timeout);

}  // namespace infergate::slurm
