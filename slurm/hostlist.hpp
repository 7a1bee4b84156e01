// Slurm hostlist expansion ("gpu[001-004,010],r[1-2]n[01-02]") without scontrol, plus an
// optional scontrol fallback for syntax we do not understand natively, and the host-name rules
// every discovered host must pass.
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
// RFC 1035 limits, for a name written without a trailing '.'.
inline constexpr std::size_t kMaxDnsNameLength = 253;
inline constexpr std::size_t kMaxDnsLabelLength = 63;

// Expands a hostlist in the order `scontrol show hostnames` prints it. Throws HostlistError.
// Host names are not validated here (see host_name_problem): the expansion is scontrol's, and
// the caller knows the suffix and domain that complete them. When `positions` is given, it
// receives, for each host, the position of the host pattern it came from, counted like
// HostlistError's (from the first character that is not whitespace).
std::vector<std::string> expand_hostlist(std::string_view list,
                                         std::size_t max_hosts = kDefaultMaxHosts,
                                         std::vector<std::size_t>* positions = nullptr);

// Why `name` is not a host name a URL can carry, or empty when it is one. A host name is a DNS
// name (ASCII letters, digits, '-' and '_', which clusters use; labels of 1 to 63 characters that
// neither start nor end with '-'; at most 253 characters) or a dotted-quad IPv4 address. A name
// whose last label is all digits must be such an address: resolvers read "1" or "0x7f.1" as one.
std::string host_name_problem(std::string_view name);

// Why `domain` (slurm.domain, which follows a '.' after each host name and may be written with
// that '.') is not a valid domain, or empty when it is one or empty (no domain). The problem is
// host_name_problem's, for the domain without its leading '.'.
std::string domain_problem(std::string_view domain);

// Four decimal numbers 0-255 without leading zeros: inet_aton reads "010" as octal 8 and "127.1"
// as 127.0.0.1, so any other form of digits and dots would silently name another host or none.
bool is_dotted_quad(std::string_view name);

// The first character of `text` that no host name may contain, described, or empty when none:
// for parts of a name (a suffix) that need not be a whole name.
std::string host_name_character_problem(std::string_view text);

// `text` in single quotes with control characters escaped (\r, \n, \t, \xNN), so that an
// error message quoting untrusted input stays on one line.
std::string quoted_for_message(std::string_view text);

// Runs `scontrol show hostnames LIST` with a deadline (any length; never waits longer, never
// gives up sooner). Every line must be a host name (host_name_problem) and there may be at most
// `max_hosts` of them. Throws std::runtime_error naming the command and the failure (not found,
// timed out, non-zero exit, empty output, a bad line and its number, too many hosts).
std::vector<std::string> scontrol_hostnames(std::string_view list,
                                            std::chrono::milliseconds timeout,
                                            std::size_t max_hosts = kDefaultMaxHosts);

}  // namespace infergate::slurm
