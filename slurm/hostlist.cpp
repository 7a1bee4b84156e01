#include "slurm/hostlist.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
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
  std::size_t position = 0;  // where the pattern starts in the list
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

bool is_host_name_character(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         ch == '-' || ch == '_' || ch == '.';
}

bool all_digits(std::string_view text) {
  return !text.empty() && text.find_first_not_of("0123456789") == std::string_view::npos;
}

std::string hex_byte(unsigned char byte) {
  constexpr char kDigits[] = "0123456789abcdef";
  return {'0', 'x', kDigits[byte >> 4], kDigits[byte & 0xf]};
}

}  // namespace

bool is_dotted_quad(std::string_view name) {
  int parts = 0;
  for (std::size_t start = 0;; ++parts) {
    const auto dot = name.find('.', start);
    const auto part = name.substr(start, dot == std::string_view::npos ? dot : dot - start);
    if (!all_digits(part) || part.size() > 3 || (part.size() > 1 && part.front() == '0'))
      return false;
    if (std::stoi(std::string(part)) > 255) return false;
    if (dot == std::string_view::npos) return parts == 3;
    start = dot + 1;
  }
}

std::string quoted_for_message(std::string_view text) {
  std::string out;  // appended piecewise: GCC 12 warns falsely (-Wrestrict) on "'" + s + "'"
  out.reserve(text.size() + 2);
  out += '\'';
  for (char ch : text) {
    const auto byte = static_cast<unsigned char>(ch);
    if (ch == '\r') {
      out += "\\r";
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '\t') {
      out += "\\t";
    } else if (byte < 0x20 || byte == 0x7f) {
      out += "\\x";
      out += hex_byte(byte).substr(2);
    } else {
      out += ch;
    }
  }
  out += '\'';
  return out;
}

std::string host_name_character_problem(std::string_view text) {
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (is_host_name_character(ch)) continue;
    const auto byte = static_cast<unsigned char>(ch);
    const std::string what = byte >= 0x20 && byte < 0x7f ? std::string("character '") + ch + "'"
                                                         : "byte " + hex_byte(byte);
    return what + " at offset " + std::to_string(i) +
           " is not allowed in a host name (only ASCII letters, digits, '-', '_' and '.')";
  }
  return {};
}

std::string host_name_problem(std::string_view name) {
  if (name.empty()) return "empty name";
  if (auto bad = host_name_character_problem(name); !bad.empty()) return bad;
  if (name.size() > kMaxDnsNameLength) {
    return std::to_string(name.size()) + " characters long, more than " +
           std::to_string(kMaxDnsNameLength);
  }
  std::string_view last_label;
  for (std::size_t start = 0;;) {
    const auto dot = name.find('.', start);
    const auto label = name.substr(start, dot == std::string_view::npos ? dot : dot - start);
    const auto where = " at offset " + std::to_string(start);
    if (label.empty()) return "empty label" + where + " (a leading, trailing or doubled '.')";
    if (label.size() > kMaxDnsLabelLength) {
      return "label" + where + " is " + std::to_string(label.size()) +
             " characters long, more than " + std::to_string(kMaxDnsLabelLength);
    }
    // A leading '-' also makes the name read as an option where a restart hook passes it to a
    // command ("srun -w {host}").
    if (label.front() == '-')
      return "label " + quoted_for_message(label) + where + " starts with '-'";
    if (label.back() == '-') return "label " + quoted_for_message(label) + where + " ends with '-'";
    last_label = label;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  if (all_digits(last_label) && !is_dotted_quad(name)) {
    return "the last label is all digits, so resolvers read the name as an IPv4 address, but it is "
           "not a dotted quad (four numbers 0-255 without leading zeros)";
  }
  return {};
}

std::string domain_problem(std::string_view domain) {
  if (domain.empty()) return {};
  return host_name_problem(domain.front() == '.' ? domain.substr(1) : domain);
}

HostlistError::HostlistError(std::string_view list, std::size_t position, std::string_view problem)
    : std::runtime_error("hostlist " + quoted_for_message(list) + ": position " +
                         std::to_string(position) + ": " + std::string(problem)),
      position_(position) {}

std::vector<std::string> expand_hostlist(std::string_view input, std::size_t max_hosts,
                                         std::vector<std::size_t>* positions) {
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
    current.position = item_start;
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
  if (positions) {
    positions->clear();
    positions->reserve(static_cast<std::size_t>(total));
  }
  for (const auto& p : patterns) {
    std::string prefix = p.literals.front();
    expand_pattern(p, 0, prefix, hosts);
    if (positions) positions->resize(hosts.size(), p.position);
  }
  return hosts;
}

std::vector<std::string> scontrol_hostnames(std::string_view list,
                                            std::chrono::milliseconds timeout,
                                            std::size_t max_hosts) {
  using Clock = std::chrono::steady_clock;
  const std::string command = "scontrol show hostnames " + quoted_for_message(list);
  // Every valid line fits in a host name and its newline: more output than that for max_hosts
  // lines is refused while reading, before it fills memory.
  const std::size_t max_output =
      max_hosts < std::numeric_limits<std::size_t>::max() / (kMaxDnsNameLength + 1)
          ? max_hosts * (kMaxDnsNameLength + 1)
          : std::numeric_limits<std::size_t>::max();
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(command + ": pipe: " + std::strerror(errno));
  // Its error message ("Invalid hostlist") goes to a memory file, read once it has exited.
  const int err_fd = ::memfd_create("scontrol-stderr", MFD_CLOEXEC);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  if (err_fd >= 0) {
    posix_spawn_file_actions_adddup2(&actions, err_fd, STDERR_FILENO);
  } else {
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  }
  // In a process group of its own, so that a timeout ends whatever it started too.
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attributes, 0);
  std::string arg_list(list);
  char* argv[] = {const_cast<char*>("scontrol"), const_cast<char*>("show"),
                  const_cast<char*>("hostnames"), arg_list.data(), nullptr};
  pid_t pid = 0;
  int rc = ::posix_spawnp(&pid, "scontrol", &actions, &attributes, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    if (err_fd >= 0) ::close(err_fd);
    throw std::runtime_error(command + ": cannot run scontrol: " + std::strerror(rc));
  }
  std::string output;
  // A deadline past the clock's range saturates instead of wrapping into the past.
  const auto now = Clock::now();
  const auto room =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::time_point::max() - now);
  const auto deadline = timeout >= room ? Clock::time_point::max() : now + timeout;
  bool timed_out = false;
  bool too_much = false;
  for (;;) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    // poll() takes an int: a longer wait is done in several calls (a cast would wrap to a
    // negative value, "wait forever", or to 0, "return at once").
    constexpr long long kMaxPollMs = std::numeric_limits<int>::max();
    pollfd p{fds[0], POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), kMaxPollMs)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) continue;  // the loop's head decides whether the deadline has passed
    if (ready < 0) break;
    char buf[4096];
    auto n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    output.append(buf, static_cast<std::size_t>(n));
    if (output.size() > max_output) {
      too_much = true;
      break;
    }
  }
  ::close(fds[0]);
  if (timed_out || too_much) ::kill(-pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  // The first line scontrol wrote to its standard error, for the messages below.
  std::string said;
  if (err_fd >= 0) {
    char buf[512];
    const auto n = ::pread(err_fd, buf, sizeof buf, 0);
    ::close(err_fd);
    if (n > 0) {
      std::string_view text(buf, static_cast<std::size_t>(n));
      text = text.substr(0, text.find('\n'));
      while (!text.empty() && (text.back() == '\r' || text.back() == ' ')) text.remove_suffix(1);
      if (!text.empty()) said = " (scontrol said: " + quoted_for_message(text) + ")";
    }
  }
  const auto too_many_hosts = [&] {
    return std::runtime_error(command + ": printed more than " + std::to_string(max_hosts) +
                              " hosts");
  };
  if (timed_out) throw std::runtime_error(command + ": timed out after " + std::to_string(timeout.count()) + "ms");
  if (too_much) throw too_many_hosts();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error(command + ": failed (" +
                             (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status)) : std::string("killed")) +
                             ")" + said);
  }
  std::vector<std::string> hosts;
  std::size_t start = 0;
  while (start < output.size()) {
    auto end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    const std::string_view line = std::string_view(output).substr(start, end - start);
    if (hosts.size() == max_hosts) throw too_many_hosts();
    if (auto problem = host_name_problem(line); !problem.empty()) {
      throw std::runtime_error(command + ": line " + std::to_string(hosts.size() + 1) + " " +
                               quoted_for_message(line) + " is not a host name: " + problem);
    }
    hosts.emplace_back(line);
    start = end + 1;
  }
  if (hosts.empty()) throw std::runtime_error(command + ": printed no hosts" + said);
  return hosts;
}

}  // namespace infergate::slurm
