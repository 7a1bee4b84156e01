#include "slurm/hostlist.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

extern char** environ;

namespace infergate::slurm {
namespace {

// One bracket group's values, e.g. "001-003,010" -> {"001","002","003","010"} (lazily: ranges).
struct Range {
  std::uint64_t low = 0;
  std::uint64_t high = 0;
  std::size_t width = 0;  // zero padding, from the text of the lower bound
};

struct Group {
  std::vector<Range> ranges;
  // Saturates at the uint64 maximum instead of wrapping: only "more than max_hosts" matters.
  std::uint64_t count() const {
    constexpr auto kMax = std::numeric_limits<std::uint64_t>::max();
    std::uint64_t n = 0;
    for (const auto& r : ranges) {
      const std::uint64_t values = r.high - r.low;  // one less than the range's size
      if (values >= kMax - n) return kMax;
      n += values + 1;
    }
    return n;
  }
  // The longest text one value of the group can take, padding included.
  std::size_t max_width() const {
    std::size_t width = 0;
    for (const auto& r : ranges) width = std::max({width, r.width, std::to_string(r.high).size()});
    return width;
  }
};

// A host pattern: literal text interleaved with bracket groups: parts[0] g[0] parts[1] g[1] ...
struct Pattern {
  std::vector<std::string> literals;
  std::vector<Group> groups;
};

constexpr std::uint64_t kMaxNumber = 999'999'999'999ULL;

// Slurm's own hostlists have at most a few bracket groups per host (one per dimension, and
// Slurm knows at most 5); the expansion recurses once per group, so a hostile
// "a[1][1][1]..." must not be allowed to exhaust the stack.
constexpr std::size_t kMaxGroupsPerHost = 16;
// The longest host name DNS can resolve (RFC 1035: 255 octets for a whole name).
constexpr std::size_t kMaxHostNameLength = 255;

std::uint64_t parse_number(std::string_view list, std::size_t pos, std::string_view digits) {
  if (digits.empty()) throw HostlistError(list, pos, "expected a number");
  if (digits.size() > 12) throw HostlistError(list, pos, "number too large");
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    char ch = digits[i];
    if (ch < '0' || ch > '9') {
      throw HostlistError(list, pos + i,
                          std::string("non-numeric range '") + std::string(digits) + "'");
    }
    value = value * 10 + static_cast<std::uint64_t>(ch - '0');
  }
  if (value > kMaxNumber) throw HostlistError(list, pos, "number too large");
  return value;
}

// Parses the inside of "[...]" starting at `begin` (just after '['), ending at `end` (']').
Group parse_group(std::string_view list, std::size_t begin, std::size_t end) {
  Group g;
  if (begin == end) throw HostlistError(list, begin, "empty brackets");
  std::size_t pos = begin;
  while (pos <= end) {
    std::size_t comma = list.find(',', pos);
    if (comma == std::string_view::npos || comma > end) comma = end;
    auto item = list.substr(pos, comma - pos);
    if (item.empty()) throw HostlistError(list, pos, "empty item in brackets");
    Range r;
    auto dash = item.find('-');
    if (dash == std::string_view::npos) {
      r.low = r.high = parse_number(list, pos, item);
      r.width = item.size();
    } else {
      auto lo = item.substr(0, dash);
      auto hi = item.substr(dash + 1);
      if (lo.empty()) throw HostlistError(list, pos, "range without a start");
      if (hi.empty()) throw HostlistError(list, pos + dash + 1, "range without an end");
      r.low = parse_number(list, pos, lo);
      r.high = parse_number(list, pos + dash + 1, hi);
      r.width = lo.size();
      if (r.high < r.low) {
        throw HostlistError(list, pos, "reversed range '" + std::string(item) + "'");
      }
    }
    g.ranges.push_back(r);
    pos = comma + 1;
  }
  return g;
}

std::string padded(std::uint64_t value, std::size_t width) {
  auto text = std::to_string(value);
  if (text.size() < width) text.insert(0, width - text.size(), '0');
  return text;
}

void expand_pattern(const Pattern& p, std::size_t group, std::string& prefix,
                    std::vector<std::string>& out) {
  if (group == p.groups.size()) {
    out.push_back(prefix);
    return;
  }
  for (const auto& r : p.groups[group].ranges) {
    for (std::uint64_t v = r.low; v <= r.high; ++v) {
      const auto size = prefix.size();
      prefix += padded(v, r.width);
      prefix += p.literals[group + 1];
      expand_pattern(p, group + 1, prefix, out);
      prefix.resize(size);
    }
  }
}

}  // namespace

HostlistError::HostlistError(std::string_view list, std::size_t position, std::string_view problem)
    : std::runtime_error("hostlist '" + std::string(list) + "': position " + std::to_string(position) +
                         ": " + std::string(problem)),
      position_(position) {}

std::vector<std::string> expand_hostlist(std::string_view input, std::size_t max_hosts) {
  // Only surrounding whitespace is forgiven (a value pasted with a newline); Slurm has no spaces.
  std::size_t offset = 0;
  while (offset < input.size() && std::isspace(static_cast<unsigned char>(input[offset]))) ++offset;
  std::string_view list = input.substr(offset);
  while (!list.empty() && std::isspace(static_cast<unsigned char>(list.back()))) list.remove_suffix(1);
  if (list.empty()) throw HostlistError(input, 0, "empty hostlist");

  // First pass: split into host patterns at top-level commas and validate; count hosts before
  // materialising any, so "n[0-99999999]" fails at once instead of exhausting memory.
  std::vector<Pattern> patterns;
  std::uint64_t total = 0;
  std::size_t item_start = 0;
  Pattern current;
  current.literals.emplace_back();
  auto finish_item = [&](std::size_t pos) {
    if (current.groups.empty() && current.literals.front().empty()) {
      throw HostlistError(list, pos, "empty host name");
    }
    std::size_t name_length = 0;
    for (const auto& literal : current.literals) name_length += literal.size();
    for (const auto& g : current.groups) name_length += g.max_width();
    if (name_length > kMaxHostNameLength) {
      throw HostlistError(list, item_start,
                          "host name too long: up to " + std::to_string(name_length) +
                              " characters, the limit is " + std::to_string(kMaxHostNameLength));
    }
    const auto too_many = [&] {
      return HostlistError(list, item_start,
                           "expands to more than " + std::to_string(max_hosts) + " hosts");
    };
    // Each product is checked before it is formed, so it cannot wrap around (2^16 * 2^48 is 0
    // in uint64) and slip under the limit.
    std::uint64_t n = 1;
    for (const auto& g : current.groups) {
      const std::uint64_t count = g.count();
      if (count > max_hosts / n) throw too_many();
      n *= count;
    }
    if (n > max_hosts - total) throw too_many();
    total += n;
    patterns.push_back(std::move(current));
    current = Pattern{};
    current.literals.emplace_back();
  };
  for (std::size_t pos = 0; pos < list.size(); ++pos) {
    char ch = list[pos];
    if (ch == ',') {
      finish_item(pos);
      item_start = pos + 1;
    } else if (ch == '[') {
      auto close = list.find(']', pos + 1);
      auto next_open = list.find('[', pos + 1);
      if (close == std::string_view::npos) throw HostlistError(list, pos, "unbalanced '[': no closing ']'");
      if (next_open != std::string_view::npos && next_open < close) {
        throw HostlistError(list, next_open, "nested '['");
      }
      if (current.groups.size() == kMaxGroupsPerHost) {
        throw HostlistError(
            list, pos,
            "more than " + std::to_string(kMaxGroupsPerHost) + " bracket groups in one host name");
      }
      current.groups.push_back(parse_group(list, pos + 1, close));
      current.literals.emplace_back();
      pos = close;
    } else if (ch == ']') {
      throw HostlistError(list, pos, "unbalanced ']': no opening '['");
    } else if (std::isspace(static_cast<unsigned char>(ch))) {
      throw HostlistError(list, pos, "whitespace inside the hostlist");
    } else {
      current.literals.back() += ch;
    }
  }
  if (list.back() == ',') throw HostlistError(list, list.size(), "empty host name after trailing ','");
  finish_item(list.size());

  std::vector<std::string> hosts;
  hosts.reserve(static_cast<std::size_t>(total));
  for (const auto& p : patterns) {
    std::string prefix = p.literals.front();
    expand_pattern(p, 0, prefix, hosts);
  }
  return hosts;
}

std::vector<std::string> scontrol_hostnames(std::string_view list, std::chrono::milliseconds timeout) {
  const std::string command = "scontrol show hostnames '" + std::string(list) + "'";
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(command + ": pipe: " + std::strerror(errno));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::string arg_list(list);
  char* argv[] = {const_cast<char*>("scontrol"), const_cast<char*>("show"),
                  const_cast<char*>("hostnames"), arg_list.data(), nullptr};
  pid_t pid = 0;
  int rc = ::posix_spawnp(&pid, "scontrol", &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    throw std::runtime_error(command + ": cannot run scontrol: " + std::strerror(rc));
  }
  std::string output;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      timed_out = ready == 0;
      break;
    }
    char buf[4096];
    auto n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    output.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) throw std::runtime_error(command + ": timed out after " + std::to_string(timeout.count()) + "ms");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error(command + ": failed (" +
                             (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status)) : std::string("killed")) +
                             ")");
  }
  std::vector<std::string> hosts;
  std::size_t start = 0;
  while (start < output.size()) {
    auto end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    if (end > start) hosts.emplace_back(output.substr(start, end - start));
    start = end + 1;
  }
  if (hosts.empty()) throw std::runtime_error(command + ": printed no hosts");
  return hosts;
}

}  // namespace infergate::slurm
