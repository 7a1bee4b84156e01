#include "config/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "config/units.hpp"
#include "slurm/hostlist.hpp"

extern char** environ;

namespace infergate::config {
namespace {

enum class Kind { kString, kInt, kBool, kDuration, kSize, kList, kEndpoint };

// Parses a value into the config; returns an error text ("invalid duration 'x' ...") or empty.
using Setter = std::function<std::string(Config&, std::string_view)>;
using Getter = std::function<std::string(const Config&)>;

struct KeySpec {
  std::string key;
  Kind kind;
  std::string help;
  Setter set;
  Getter get;
  // Lists are given whole in the file and env; flags append.
  std::function<void(Config&)> clear;
};

std::optional<long long> parse_integer(std::string_view text) {
  long long value = 0;
  if (text.empty()) return std::nullopt;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || ptr != text.data() + text.size()) return std::nullopt;
  return value;
}

template <typename Field>
Setter make_int(Field field, long long min, long long max) {
  return [field, min, max](Config& c, std::string_view v) -> std::string {
    auto n = parse_integer(v);
    if (!n) return "expected an integer, got " + slurm::quoted_for_message(v);
    if (*n < min || *n > max) {
      return "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " +
             slurm::quoted_for_message(v);
    }
    field(c) = static_cast<int>(*n);
    return {};
  };
}

template <typename Field>
Setter make_optional_int(Field field, long long min, long long max) {
  return [field, min, max](Config& c, std::string_view v) -> std::string {
    if (v.empty() || v == "null" || v == "~") {
      field(c).reset();
      return {};
    }
    auto n = parse_integer(v);
    if (!n) return "expected an integer, got " + slurm::quoted_for_message(v);
    if (*n < min || *n > max) {
      return "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " +
             slurm::quoted_for_message(v);
    }
    field(c) = static_cast<int>(*n);
    return {};
  };
}

template <typename Field>
Setter make_duration(Field field) {
  return [field](Config& c, std::string_view v) -> std::string {
    auto d = parse_duration(v);
    if (!d) return duration_error(v);
    field(c) = *d;
    return {};
  };
}

template <typename Field>
Setter make_positive_duration(Field field) {
  return [field](Config& c, std::string_view v) -> std::string {
    auto d = parse_duration(v);
    if (!d) return duration_error(v);
    if (d->count() <= 0) return "must be greater than zero, got " + slurm::quoted_for_message(v);
    field(c) = *d;
    return {};
  };
}

template <typename Field>
Setter make_size(Field field, std::uint64_t min) {
  return [field, min](Config& c, std::string_view v) -> std::string {
    auto s = parse_size(v);
    if (!s) return "invalid size " + slurm::quoted_for_message(v) + " (expected e.g. 65536, 64KiB, 64MiB)";
    if (*s < min) return "must be at least " + format_size(min) + ", got " + slurm::quoted_for_message(v);
    field(c) = *s;
    return {};
  };
}

std::optional<bool> parse_bool(std::string_view v) {
  if (v == "true" || v == "1" || v == "yes" || v == "on") return true;
  if (v == "false" || v == "0" || v == "no" || v == "off") return false;
  return std::nullopt;
}

template <typename Field>
Setter make_bool(Field field) {
  return [field](Config& c, std::string_view v) -> std::string {
    auto b = parse_bool(v);
    if (!b) return "expected true or false, got " + slurm::quoted_for_message(v);
    field(c) = *b;
    return {};
  };
}

// `aliases`: other words for a choice, as {alias, choice}; the choice is what is kept.
template <typename Field>
Setter make_choice(Field field, std::vector<std::string> choices,
                   std::vector<std::pair<std::string, std::string>> aliases = {}) {
  return [field, choices, aliases](Config& c, std::string_view v) -> std::string {
    for (const auto& [alias, choice] : aliases) {
      if (v == alias) v = choice;
    }
    if (std::find(choices.begin(), choices.end(), v) == choices.end()) {
      std::string all;
      for (const auto& choice : choices) {
        all += (all.empty() ? "" : ", ") + choice;
        for (const auto& [alias, target] : aliases) {
          if (target == choice) all += " (or " + alias + ")";
        }
      }
      return "must be one of " + all + ", got " + slurm::quoted_for_message(v);
    }
    field(c) = std::string(v);
    return {};
  };
}

constexpr std::string_view kRedacted = "***";  // `infergate config` shows this, not the token

// A value as a double-quoted YAML scalar, so that `infergate config` output reads back as the
// same value whatever it contains ('#', '[', ': ', quotes).
std::string yaml_quoted(std::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[(ch >> 4) & 0xf];
      out += kHex[ch & 0xf];
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

// Whether a text value must be quoted to read back as itself: anything beyond a plain word,
// path or address, and the words YAML reads as something else.
bool needs_yaml_quotes(std::string_view s) {
  if (s.empty() || s == "null" || s == "~" || s == "true" || s == "false" || s == "yes" || s == "no" ||
      s == "on" || s == "off") {
    return true;
  }
  return !std::all_of(s.begin(), s.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '.' || ch == '/' || ch == '-';
  });
}

template <typename T>
std::string optional_text(const std::optional<T>& v) {
  if (!v) return "null";
  if constexpr (std::is_same_v<T, std::string>) {
    return *v;
  } else {
    return std::to_string(*v);
  }
}

// Parses an address to listen on into `out`; returns why `v` is not one, or empty.
std::string parse_listen(std::string_view v, Endpoint& out) {
  std::string problem;
  auto ep = parse_endpoint(v, &problem);
  if (!ep) return problem.empty() ? "expected HOST:PORT, got " + slurm::quoted_for_message(v) : problem;
  out = *ep;
  return {};
}

std::string set_backends(Config& c, std::string_view v, bool append) {
  if (!append) c.backends.clear();
  std::string_view rest = v;
  while (!rest.empty()) {
    auto comma = rest.find(',');
    auto item = rest.substr(0, comma);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (!item.empty()) {
      std::string url(item);
      if (url.find("://") == std::string::npos) url = "http://" + url;
      std::string problem;
      if (!parse_backend_url(url, &problem)) {
        return "invalid backend URL " + slurm::quoted_for_message(item) + ": " + problem;
      }
      while (url.back() == '/') url.pop_back();
      c.backends.push_back(url);
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return {};
}

const std::vector<KeySpec>& specs() {
  static const std::vector<KeySpec> table = [] {
    std::vector<KeySpec> t;
    auto add = [&t](std::string key, Kind kind, std::string help, Setter set, Getter get) {
      t.push_back(KeySpec{std::move(key), kind, std::move(help), std::move(set), std::move(get), {}});
    };
    add("listen", Kind::kEndpoint, "address the gateway listens on (HOST:PORT; port 0 = any)",
        [](Config& c, std::string_view v) { return parse_listen(v, c.listen); },
        [](const Config& c) { return c.listen.to_string(); });
    add("threads", Kind::kInt, "worker threads (0 = one per hardware thread)",
        make_int([](Config& c) -> int& { return c.threads; }, 0, 1024),
        [](const Config& c) { return std::to_string(c.threads); });
    t.push_back(KeySpec{
        "backends", Kind::kList, "static backend URLs (http://host:port), added to Slurm's",
        [](Config& c, std::string_view v) { return set_backends(c, v, true); },
        [](const Config& c) {
          std::string out = "[";
          for (std::size_t i = 0; i < c.backends.size(); ++i) {
            out += (i ? ", " : "") + yaml_quoted(c.backends[i]);
          }
          return out + "]";
        },
        [](Config& c) { c.backends.clear(); }});
    add("slurm.enabled", Kind::kBool, "discover backends from the Slurm job's environment",
        make_bool([](Config& c) -> bool& { return c.slurm.enabled; }),
        [](const Config& c) { return c.slurm.enabled ? "true" : "false"; });
    add("slurm.nodelist", Kind::kString, "hostlist to use instead of SLURM_JOB_NODELIST",
        [](Config& c, std::string_view v) -> std::string {
          if (v.empty() || v == "null") {
            c.slurm.nodelist.reset();
          } else {
            c.slurm.nodelist = std::string(v);
          }
          return {};
        },
        [](const Config& c) { return optional_text(c.slurm.nodelist); });
    add("slurm.training_nodes", Kind::kInt, "leading hosts that train (else NUM_TRAINING_NODES, else 1)",
        make_optional_int([](Config& c) -> std::optional<int>& { return c.slurm.training_nodes; }, 0, 100000),
        [](const Config& c) { return optional_text(c.slurm.training_nodes); });
    add("slurm.infer_tp", Kind::kInt, "GPUs per inference server (else INFER_TP, else 1)",
        make_optional_int([](Config& c) -> std::optional<int>& { return c.slurm.infer_tp; }, 1, 1024),
        [](const Config& c) { return optional_text(c.slurm.infer_tp); });
    add("slurm.gpus_per_node", Kind::kInt,
        "GPUs per inference node (else SLURM_GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else 8)",
        make_optional_int([](Config& c) -> std::optional<int>& { return c.slurm.gpus_per_node; }, 1,
                          1024),
        [](const Config& c) { return optional_text(c.slurm.gpus_per_node); });
    add("slurm.base_port", Kind::kInt, "port of the first inference server on each node",
        make_int([](Config& c) -> int& { return c.slurm.base_port; }, 1, 65535),
        [](const Config& c) { return std::to_string(c.slurm.base_port); });
    // The suffix and the domain are checked here, where the key's origin is known, and not
    // only by Slurm discovery: that runs only inside a job, so a typo would pass `infergate
    // config` and fail later on the cluster. The rules are discovery's (slurm/hostlist.hpp).
    add("slurm.host_suffix", Kind::kString, "appended to each host name (e.g. -ib)",
        [](Config& c, std::string_view v) -> std::string {
          if (auto problem = slurm::host_name_character_problem(v); !problem.empty()) {
            return slurm::quoted_for_message(v) + ": " + problem;
          }
          c.slurm.host_suffix = std::string(v);
          return {};
        },
        [](const Config& c) { return yaml_quoted(c.slurm.host_suffix); });
    add("slurm.domain", Kind::kString, "domain appended to each host name (e.g. cluster.local)",
        [](Config& c, std::string_view v) -> std::string {
          if (auto problem = slurm::domain_problem(v); !problem.empty()) {
            return slurm::quoted_for_message(v) + " is not a valid domain: " + problem;
          }
          c.slurm.domain = std::string(v);
          return {};
        },
        [](const Config& c) { return yaml_quoted(c.slurm.domain); });
    add("slurm.het_group", Kind::kInt, "heterogeneous job: read SLURM_JOB_NODELIST_HET_GROUP_<N>",
        make_optional_int([](Config& c) -> std::optional<int>& { return c.slurm.het_group; }, 0, 1000),
        [](const Config& c) { return optional_text(c.slurm.het_group); });
    add("slurm.use_scontrol", Kind::kBool, "fall back to `scontrol show hostnames` for odd hostlists",
        make_bool([](Config& c) -> bool& { return c.slurm.use_scontrol; }),
        [](const Config& c) { return c.slurm.use_scontrol ? "true" : "false"; });
    add("slurm.scontrol_timeout", Kind::kDuration, "deadline for the scontrol fallback",
        make_positive_duration([](Config& c) -> milliseconds& { return c.slurm.scontrol_timeout; }),
        [](const Config& c) { return format_duration(c.slurm.scontrol_timeout); });
    add("health.path", Kind::kString, "health probe path (/health, /health_generate, /v1/models)",
        [](Config& c, std::string_view v) -> std::string {
          if (v.empty() || v.front() != '/') return "must start with '/', got " + slurm::quoted_for_message(v);
          // It goes into the probe's request line as it is.
          if (std::any_of(v.begin(), v.end(), [](char ch) { return ch <= ' ' || ch > '~'; })) {
            return "must be a path without spaces, control characters or non-ASCII bytes, got " +
                   slurm::quoted_for_message(v);
          }
          c.health.path = std::string(v);
          return {};
        },
        [](const Config& c) { return c.health.path; });
    add("health.interval", Kind::kDuration, "time between probes of one backend (jittered)",
        make_positive_duration([](Config& c) -> milliseconds& { return c.health.interval; }),
        [](const Config& c) { return format_duration(c.health.interval); });
    add("health.timeout", Kind::kDuration, "probe timeout",
        make_positive_duration([](Config& c) -> milliseconds& { return c.health.timeout; }),
        [](const Config& c) { return format_duration(c.health.timeout); });
    add("health.healthy_threshold", Kind::kInt, "consecutive passing probes to become healthy",
        make_int([](Config& c) -> int& { return c.health.healthy_threshold; }, 1, 100),
        [](const Config& c) { return std::to_string(c.health.healthy_threshold); });
    add("health.unhealthy_threshold", Kind::kInt, "consecutive failing probes to become unhealthy",
        make_int([](Config& c) -> int& { return c.health.unhealthy_threshold; }, 1, 100),
        [](const Config& c) { return std::to_string(c.health.unhealthy_threshold); });
    add("health.min_healthy_backends", Kind::kInt, "healthy backends needed for /ready to be 200",
        make_int([](Config& c) -> int& { return c.health.min_healthy_backends; }, 0, 1000000),
        [](const Config& c) { return std::to_string(c.health.min_healthy_backends); });
    add("passive.failures", Kind::kInt, "consecutive request failures that eject a backend",
        make_int([](Config& c) -> int& { return c.passive.failures; }, 1, 1000),
        [](const Config& c) { return std::to_string(c.passive.failures); });
    add("passive.ejection_base", Kind::kDuration, "first ejection time (doubles each time)",
        make_positive_duration([](Config& c) -> milliseconds& { return c.passive.ejection_base; }),
        [](const Config& c) { return format_duration(c.passive.ejection_base); });
    add("passive.ejection_max", Kind::kDuration, "longest ejection time",
        make_positive_duration([](Config& c) -> milliseconds& { return c.passive.ejection_max; }),
        [](const Config& c) { return format_duration(c.passive.ejection_max); });
    add("timeouts.connect", Kind::kDuration, "upstream TCP connect timeout",
        make_positive_duration([](Config& c) -> milliseconds& { return c.timeouts.connect; }),
        [](const Config& c) { return format_duration(c.timeouts.connect); });
    add("timeouts.first_byte", Kind::kDuration, "wait for the upstream response header",
        make_positive_duration([](Config& c) -> milliseconds& { return c.timeouts.first_byte; }),
        [](const Config& c) { return format_duration(c.timeouts.first_byte); });
    add("timeouts.idle", Kind::kDuration, "longest gap between upstream body reads",
        make_positive_duration([](Config& c) -> milliseconds& { return c.timeouts.idle; }),
        [](const Config& c) { return format_duration(c.timeouts.idle); });
    add("timeouts.total", Kind::kDuration, "whole request, retries included, to the last byte (0: no limit)",
        make_duration([](Config& c) -> milliseconds& { return c.timeouts.total; }),
        [](const Config& c) { return format_duration(c.timeouts.total); });
    add("timeouts.client_header", Kind::kDuration, "time a client has to send a request's header",
        make_positive_duration([](Config& c) -> milliseconds& { return c.timeouts.client_header; }),
        [](const Config& c) { return format_duration(c.timeouts.client_header); });
    add("timeouts.client_idle", Kind::kDuration, "idle keep-alive client connections are closed after",
        make_positive_duration([](Config& c) -> milliseconds& { return c.timeouts.client_idle; }),
        [](const Config& c) { return format_duration(c.timeouts.client_idle); });
    add("timeouts.shutdown", Kind::kDuration, "on SIGTERM, how long in-flight requests may finish",
        make_duration([](Config& c) -> milliseconds& { return c.timeouts.shutdown; }),
        [](const Config& c) { return format_duration(c.timeouts.shutdown); });
    add("timeouts.queue", Kind::kDuration,
        "how long a request waits for a backend with room (limits.max_inflight_per_backend); 503 after it",
        make_duration([](Config& c) -> milliseconds& { return c.timeouts.queue; }),
        [](const Config& c) { return format_duration(c.timeouts.queue); });
    add("timeouts.no_healthy_backend", Kind::kDuration,
        "how long a request waits for a healthy backend when none is; 503 after it (0: at once)",
        make_duration([](Config& c) -> milliseconds& { return c.timeouts.no_healthy_backend; }),
        [](const Config& c) { return format_duration(c.timeouts.no_healthy_backend); });
    add("limits.max_body", Kind::kSize, "largest request body (413 above)",
        make_size([](Config& c) -> std::uint64_t& { return c.limits.max_body; }, 1),
        [](const Config& c) { return format_size(c.limits.max_body); });
    add("limits.max_header", Kind::kSize, "largest request header block (431 above)",
        make_size([](Config& c) -> std::uint64_t& { return c.limits.max_header; }, 1024),
        [](const Config& c) { return format_size(c.limits.max_header); });
    add("limits.upstream_idle_per_backend", Kind::kInt, "idle keep-alive connections kept per backend per thread",
        make_int([](Config& c) -> int& { return c.limits.upstream_idle_per_backend; }, 0, 100000),
        [](const Config& c) { return std::to_string(c.limits.upstream_idle_per_backend); });
    add("limits.max_client_connections", Kind::kInt,
        "client connections held at once; more wait in the listen backlog (0: from the open-file limit)",
        make_int([](Config& c) -> int& { return c.limits.max_client_connections; }, 0, 10000000),
        [](const Config& c) { return std::to_string(c.limits.max_client_connections); });
    add("limits.max_body_memory", Kind::kSize,
        "request-body bytes held at once across all connections; a body past it gets 503 (0: automatic)",
        make_size([](Config& c) -> std::uint64_t& { return c.limits.max_body_memory; }, 0),
        [](const Config& c) { return format_size(c.limits.max_body_memory); });
    add("limits.upstream_idle_timeout", Kind::kDuration, "idle upstream connections are closed after",
        make_positive_duration([](Config& c) -> milliseconds& { return c.limits.upstream_idle_timeout; }),
        [](const Config& c) { return format_duration(c.limits.upstream_idle_timeout); });
    add("limits.max_inflight_per_backend", Kind::kInt,
        "requests one backend takes at once; more wait in the gateway's queue (0: no limit)",
        make_int([](Config& c) -> int& { return c.limits.max_inflight_per_backend; }, 0, 1000000),
        [](const Config& c) { return std::to_string(c.limits.max_inflight_per_backend); });
    add("limits.max_queued", Kind::kInt,
        "requests that may wait for a backend with room; 429 beyond it (0: none wait)",
        make_int([](Config& c) -> int& { return c.limits.max_queued; }, 0, 10000000),
        [](const Config& c) { return std::to_string(c.limits.max_queued); });
    add("retries.max", Kind::kInt, "retries on a different backend before any byte reached the client",
        make_int([](Config& c) -> int& { return c.retries.max; }, 0, 100),
        [](const Config& c) { return std::to_string(c.retries.max); });
    add("retries.backoff_base", Kind::kDuration, "first retry backoff (doubles, with jitter)",
        make_duration([](Config& c) -> milliseconds& { return c.retries.backoff_base; }),
        [](const Config& c) { return format_duration(c.retries.backoff_base); });
    add("retries.backoff_max", Kind::kDuration, "largest retry backoff",
        make_duration([](Config& c) -> milliseconds& { return c.retries.backoff_max; }),
        [](const Config& c) { return format_duration(c.retries.backoff_max); });
    add("retries.after_sent", Kind::kBool,
        "also retry a request the backend received but never answered (false: a request that crashes its server reaches only one)",
        make_bool([](Config& c) -> bool& { return c.retries.after_sent; }),
        [](const Config& c) { return c.retries.after_sent ? "true" : "false"; });
    add("policy", Kind::kString,
        "load-balancing policy: round_robin, or least_inflight (the backend with the fewest requests in flight)",
        make_choice([](Config& c) -> std::string& { return c.policy; }, {"round_robin", "least_inflight"}),
        [](const Config& c) { return c.policy; });
    add("admin.token", Kind::kString, "Bearer token for /admin (empty: no auth)",
        [](Config& c, std::string_view v) -> std::string {
          if (v == kRedacted) {
            return "'" + std::string(kRedacted) +
                   "' is what `infergate config` prints in place of the token; give the token itself";
          }
          // A token no client can send would lock the admin API for good: HTTP drops the
          // whitespace around a header value, and a header cannot hold a line break.
          if (std::any_of(v.begin(), v.end(), [](char ch) {
                const auto u = static_cast<unsigned char>(ch);
                return u < 0x20 || u == 0x7f;
              })) {
            return "the token holds a control character (a line break from a YAML block or a file?), which no "
                   "Authorization header can carry";
          }
          if (!v.empty() && (v.front() == ' ' || v.back() == ' ')) {
            return "the token starts or ends with a space, which HTTP drops from a header value: no client "
                   "could send it";
          }
          c.admin_token = std::string(v);
          return {};
        },
        [](const Config& c) { return c.admin_token.empty() ? "\"\"" : "\"" + std::string(kRedacted) + "\""; });
    // The log lines print "warning": the word a user copies from them means warn.
    add("log.level", Kind::kString, "trace, debug, info, warn (or warning), error, critical, off",
        make_choice([](Config& c) -> std::string& { return c.log.level; },
                    {"trace", "debug", "info", "warn", "error", "critical", "off"}, {{"warning", "warn"}}),
        [](const Config& c) { return c.log.level; });
    add("log.format", Kind::kString, "text or json",
        make_choice([](Config& c) -> std::string& { return c.log.format; }, {"text", "json"}),
        [](const Config& c) { return c.log.format; });
    add("log.access", Kind::kBool, "one access-log line per proxied request",
        make_bool([](Config& c) -> bool& { return c.log.access; }),
        [](const Config& c) { return c.log.access ? "true" : "false"; });
    add("metrics.listen", Kind::kEndpoint, "separate HOST:PORT for /metrics (null: gateway port only)",
        [](Config& c, std::string_view v) -> std::string {
          if (v.empty() || v == "null") {
            c.metrics_listen.reset();
            return {};
          }
          Endpoint ep;
          auto problem = parse_listen(v, ep);
          if (problem.empty()) c.metrics_listen = ep;
          return problem;
        },
        [](const Config& c) { return c.metrics_listen ? c.metrics_listen->to_string() : "null"; });
    return t;
  }();
  return table;
}

const KeySpec* find_spec(std::string_view key) {
  for (const auto& spec : specs()) {
    if (spec.key == key) return &spec;
  }
  return nullptr;
}

std::string env_name(std::string_view key) {
  std::string out = "INFERGATE_";
  for (char ch : key) out += ch == '.' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return out;
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string unknown_key_message(std::string_view key) {
  std::string msg = "unknown key " + slurm::quoted_for_message(key);
  // yaml-cpp reads `<<: *defaults` as a key named "<<".
  if (key == "<<" || key.ends_with(".<<")) return msg + " (YAML merge keys are not supported: write the keys out)";
  auto near = closest_key(key);
  if (!near.empty()) msg += " (did you mean '" + near + "'?)";
  return msg;
}

std::string yaml_where(std::string_view file, const YAML::Node& node) {
  auto mark = node.Mark();
  std::string where(file);
  if (mark.line >= 0) where += ":" + std::to_string(mark.line + 1);
  return where;
}

// The YAML being read: its name for messages and its text, to look at a value as written.
struct YamlSource {
  std::string_view file;
  std::string_view text;
};

// A quoted value must end on the line where it starts. yaml-cpp reads an unterminated quote as
// a value running to the end of the file, which would swallow every key after it silently.
void check_quote_ends_on_its_line(const YamlSource& src, const YAML::Node& node) {
  const auto mark = node.Mark();
  if (mark.pos < 0 || static_cast<std::size_t>(mark.pos) >= src.text.size()) return;
  const char quote = src.text[static_cast<std::size_t>(mark.pos)];
  if (quote != '\'' && quote != '"') return;
  for (auto i = static_cast<std::size_t>(mark.pos) + 1; i < src.text.size(); ++i) {
    const char ch = src.text[i];
    if (ch == '\n' || ch == '\r') break;
    if (quote == '"' && ch == '\\') {
      ++i;  // an escaped character
      continue;
    }
    if (ch == quote) {
      if (quote == '\'' && i + 1 < src.text.size() && src.text[i + 1] == '\'') {
        ++i;  // '' is a quote inside a single-quoted value
        continue;
      }
      return;
    }
  }
  throw ConfigError(yaml_where(src.file, node) + ": the quoted value does not end on this line (a missing " +
                    (quote == '"' ? "\"" : "'") + "?)");
}

void apply_yaml_value(Config& c, const KeySpec& spec, const YAML::Node& key_node, const YAML::Node& node,
                      const YamlSource& src) {
  const auto file = src.file;
  if (spec.kind == Kind::kList) {
    spec.clear(c);
    if (node.IsNull()) return;
    if (!node.IsSequence()) {
      throw ConfigError(yaml_where(file, node) + ": " + spec.key + ": expected a list of URLs");
    }
    for (const auto& item : node) {
      if (!item.IsScalar()) {
        throw ConfigError(yaml_where(file, item) + ": " + spec.key + ": expected a URL string");
      }
      check_quote_ends_on_its_line(src, item);
      auto err = spec.set(c, item.Scalar());
      if (!err.empty()) throw ConfigError(yaml_where(file, item) + ": " + spec.key + ": " + err);
    }
    return;
  }
  if (node.IsNull()) {
    // Nothing written (`key:`), `~` or `null`: text keys become empty (no token, no suffix),
    // optional ones unset; the others need a value. The key's line: an empty value has none.
    const bool empty_ok = spec.kind == Kind::kString || spec.kind == Kind::kEndpoint;
    auto err = spec.set(c, "");
    if (!err.empty() && !empty_ok) err = "no value given";
    if (!err.empty()) throw ConfigError(yaml_where(file, key_node) + ": " + spec.key + ": " + err);
    return;
  }
  if (!node.IsScalar()) {
    throw ConfigError(yaml_where(file, node) + ": " + spec.key + ": expected a single value");
  }
  check_quote_ends_on_its_line(src, node);
  auto err = spec.set(c, node.Scalar());
  if (!err.empty()) throw ConfigError(yaml_where(file, node) + ": " + spec.key + ": " + err);
}

// `seen`: every key given so far in the file, by its full dotted name, with its line: a key may
// be written nested (`health: {interval: 1s}`) or dotted (`health.interval: 1s`), and either
// way it may be given once.
void walk_yaml(Config& c, const YAML::Node& map, const std::string& prefix, const YamlSource& src,
               std::map<std::string, int>& seen) {
  const auto file = src.file;
  for (const auto& entry : map) {
    const auto& key_node = entry.first;
    const auto& value = entry.second;
    std::string key = prefix.empty() ? key_node.Scalar() : prefix + "." + key_node.Scalar();
    // yaml-cpp keeps the last of two equal keys; the first would be silently ignored.
    if (auto [it, fresh] = seen.emplace(key, key_node.Mark().line + 1); !fresh) {
      throw ConfigError(yaml_where(file, key_node) + ": " + key + ": given twice (first on line " +
                        std::to_string(it->second) + ")");
    }
    const KeySpec* spec = find_spec(key);
    if (spec) {
      apply_yaml_value(c, *spec, key_node, value, src);
      c.sources[key] = Source::kFile;
      c.file_lines[key] = key_node.Mark().line + 1;
      continue;
    }
    bool is_section = std::any_of(specs().begin(), specs().end(), [&](const KeySpec& s) {
      return s.key.rfind(key + ".", 0) == 0;
    });
    if (is_section && value.IsMap()) {
      walk_yaml(c, value, key, src, seen);
    } else if (is_section && value.IsNull()) {
      // `slurm:` with every key under it commented out, as templates have: nothing set.
    } else if (is_section) {
      throw ConfigError(yaml_where(file, key_node) + ": " + key + ": expected a section (a map)");
    } else {
      throw ConfigError(yaml_where(file, key_node) + ": " + unknown_key_message(key));
    }
  }
}

// yaml-cpp reads one document and leaves the rest of the text unread without a word when the
// document ends early: after a top-level flow map (`{threads: 3}` then more keys), or at once
// before a stray `,`. Its parser then finds another document in the rest: the line where that
// starts, if any (asked twice at most: on some inputs it would find one for ever).
std::optional<int> line_past_the_document(std::string_view text) {
  struct DocumentStart : YAML::EventHandler {
    std::optional<YAML::Mark> mark;
    void OnDocumentStart(const YAML::Mark& at) override { mark = at; }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
    void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}
  };
  std::istringstream in{std::string(text)};
  YAML::Parser parser(in);
  DocumentStart first;
  if (!parser.HandleNextDocument(first)) return std::nullopt;
  try {
    DocumentStart second;
    if (!parser.HandleNextDocument(second) || !second.mark) return std::nullopt;
    return second.mark->line + 1;
  } catch (const YAML::Exception& e) {
    return e.mark.line + 1;  // the rest is not even YAML
  }
}

void parse_yaml_into(Config& c, std::string_view text, std::string_view file) {
  // A second document would be ignored by YAML::Load; found by its marker line, since
  // yaml-cpp's LoadAll loops forever on some inputs (a lone ",").
  {
    bool content = false;   // a line of the first document seen
    bool marked = false;    // its "---" start marker seen
    bool anything = false;  // a directive, a marker or content seen
    bool ended = false;     // a "..." end marker seen
    int line_number = 0;
    for (std::size_t at = 0; at <= text.size(); ++line_number) {
      auto end = std::min(text.find('\n', at), text.size());
      auto line = text.substr(at, end - at);
      at = end + 1;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line_number == 0 && line.starts_with("\xEF\xBB\xBF")) line.remove_prefix(3);  // a UTF-8 BOM
      auto is_marker = [&](std::string_view m) {
        return line.substr(0, 3) == m && (line.size() == 3 || line[3] == ' ' || line[3] == '\t');
      };
      const auto first = line.find_first_not_of(" \t");
      const bool blank = first == std::string_view::npos || line[first] == '#';
      // Directives (%YAML 1.2, %TAG) stand before the first document's "---"; they are not its
      // content. One at column 0 after the "---" or content starts another document, as does a
      // second "---", or anything after a "..." (yaml-cpp would read the first, empty, or
      // ignore the rest).
      const bool directive = !blank && line[0] == '%';
      const bool dashes = is_marker("---");
      const bool dots = is_marker("...");
      if ((dashes && (marked || content || ended)) || (!blank && !dots && ended) || (directive && (marked || content))) {
        throw ConfigError(std::string(file) + ":" + std::to_string(line_number + 1) +
                          ": a second YAML document; the configuration is one document");
      }
      if (dots) {
        ended = true;  // even before anything: yaml-cpp reads what follows as another document
      } else if (dashes) {
        marked = anything = true;
      } else if (directive) {
        anything = true;
      } else if (!blank) {
        content = anything = true;
      }
    }
  }
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    throw ConfigError(std::string(file) + ":" + std::to_string(e.mark.line + 1) +
                      ": invalid YAML: " + e.msg);
  }
  if (const auto rest = line_past_the_document(text)) {
    throw ConfigError(std::string(file) + ":" + std::to_string(*rest) +
                      ": invalid YAML: the document ended before this line, which would be ignored (a top-level "
                      "{...} or a stray character ends it)");
  }
  if (root.IsNull()) return;  // an empty file is fine
  if (!root.IsMap()) throw ConfigError(std::string(file) + ": expected a YAML map at the top level");
  try {
    std::map<std::string, int> seen;
    walk_yaml(c, root, "", YamlSource{file, text}, seen);
  } catch (const YAML::Exception& e) {
    throw ConfigError(std::string(file) + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
}

// Where a key's value came from, for messages about two keys at once.
std::string origin(const Config& c, const std::string& key) {
  auto it = c.sources.find(key);
  switch (it == c.sources.end() ? Source::kDefault : it->second) {
    case Source::kDefault: return "the default";
    case Source::kFile: {
      const auto line = c.file_lines.find(key);
      if (line == c.file_lines.end()) return c.config_file.empty() ? "the config file" : c.config_file;
      return c.config_file.empty() ? "line " + std::to_string(line->second) + " of the config file"
                                   : c.config_file + ":" + std::to_string(line->second);
    }
    case Source::kEnv: return env_name(key);
    case Source::kFlag: return "the command line";
  }
  return "?";
}

void validate(const Config& c) {
  if (c.passive.ejection_max < c.passive.ejection_base) {
    throw ConfigError("passive.ejection_max (" + format_duration(c.passive.ejection_max) + ", from " +
                      origin(c, "passive.ejection_max") + ") must be at least passive.ejection_base (" +
                      format_duration(c.passive.ejection_base) + ", from " + origin(c, "passive.ejection_base") +
                      ")");
  }
  if (c.retries.backoff_max < c.retries.backoff_base) {
    throw ConfigError("retries.backoff_max (" + format_duration(c.retries.backoff_max) + ", from " +
                      origin(c, "retries.backoff_max") + ") must be at least retries.backoff_base (" +
                      format_duration(c.retries.backoff_base) + ", from " + origin(c, "retries.backoff_base") +
                      ")");
  }
  if (c.limits.max_body_memory != 0 && c.limits.max_body_memory < c.limits.max_body) {
    throw ConfigError("limits.max_body_memory (" + format_size(c.limits.max_body_memory) + ", from " +
                      origin(c, "limits.max_body_memory") + ") must be at least limits.max_body (" +
                      format_size(c.limits.max_body) + ", from " + origin(c, "limits.max_body") +
                      "), or 0 for automatic: a body the gateway accepts must fit");
  }
  if (c.metrics_listen && c.metrics_listen->port != 0 && c.metrics_listen->port == c.listen.port &&
      (c.metrics_listen->host == c.listen.host || c.metrics_listen->host == "0.0.0.0" ||
       c.listen.host == "0.0.0.0")) {
    throw ConfigError("metrics.listen (" + c.metrics_listen->to_string() + ", from " + origin(c, "metrics.listen") +
                      ") must not be the gateway's own address, listen (" + c.listen.to_string() + ", from " +
                      origin(c, "listen") + "); leave it unset to serve /metrics on the gateway port");
  }
}

std::optional<std::string> process_env(std::string_view name) {
  const char* v = std::getenv(std::string(name).c_str());
  if (!v) return std::nullopt;
  return std::string(v);
}

std::vector<std::string> process_env_names() {
  std::vector<std::string> names;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry(*e);
    names.emplace_back(entry.substr(0, entry.find('=')));
  }
  return names;
}

constexpr std::string_view kEnvPrefix = "INFERGATE_";

// INFERGATE_* variables that are not configuration keys yet legitimately reach the gateway's
// environment: the scripts and test harness around it set them (deploy/demo.sh,
// tests/integration/harness.cpp, .ci/run), so warning about them would be noise.
constexpr std::array<std::string_view, 4> kNonKeyVariables{"INFERGATE_DEMO_PORT", "INFERGATE_DEMO_BACKEND_PORT",
                                                           "INFERGATE_BIN", "INFERGATE_MOCK_BIN"};

// An INFERGATE_* variable the configuration does not read is most likely a typo whose setting
// silently does nothing, so each one becomes a warning for the caller to log.
std::vector<std::string> unknown_env_warnings(const std::vector<std::string>& names) {
  std::set<std::string> unknown;  // sorted and once each, whatever the environment's order
  for (const auto& name : names) {
    if (name.rfind(kEnvPrefix, 0) != 0 || name == "INFERGATE_CONFIG") continue;
    if (std::find(kNonKeyVariables.begin(), kNonKeyVariables.end(), name) != kNonKeyVariables.end())
      continue;
    const bool known = std::any_of(specs().begin(), specs().end(),
                                   [&](const KeySpec& spec) { return env_name(spec.key) == name; });
    if (!known) unknown.insert(name);
  }
  std::vector<std::string> warnings;
  for (const auto& name : unknown) {
    std::string msg = "environment " + name + ": unknown variable, ignored";
    auto near = closest_env_name(name);
    if (!near.empty()) msg += " (did you mean " + near + "?)";
    warnings.push_back(std::move(msg));
  }
  return warnings;
}

// No configuration comes near this; a larger file is something else.
constexpr std::size_t kMaxConfigFile = 16 * 1024 * 1024;

// Reads the whole file with POSIX calls: std::ifstream opens a directory and reads it as empty,
// which would silently mean "all defaults", and it loses errno, which says why a file failed.
// Pipes still work (`--config <(generate-config)`).
std::string read_config_file(const std::string& path) {
  auto fail = [&path](int error) {
    return ConfigError("cannot read config file '" + path + "': " + std::strerror(error));
  };
  struct Fd {
    int fd;
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  } file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw fail(errno);
  struct stat st {};
  if (::fstat(file.fd, &st) == 0 && S_ISDIR(st.st_mode)) throw fail(EISDIR);
  std::string text;
  std::array<char, 8192> buf{};
  for (;;) {
    const auto n = ::read(file.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw fail(errno);
    if (n == 0) break;
    text.append(buf.data(), static_cast<std::size_t>(n));
    // A device or an endless pipe would be read until memory runs out.
    if (text.size() > kMaxConfigFile) {
      throw ConfigError("cannot read config file '" + path + "': larger than " + format_size(kMaxConfigFile) +
                        " (is it a configuration file?)");
    }
  }
  return text;
}

}  // namespace

std::string_view to_string(Source source) {
  switch (source) {
    case Source::kDefault: return "default";
    case Source::kFile: return "file";
    case Source::kEnv: return "env";
    case Source::kFlag: return "flag";
  }
  return "?";
}

std::string Endpoint::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

std::optional<Endpoint> parse_endpoint(std::string_view text, std::string* problem) {
  Endpoint ep;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return std::nullopt;
    }
    ep.host = std::string(text.substr(1, close - 1));
    port_text = text.substr(close + 2);
    // Brackets hold an IPv6 address, never a name, and never nothing.
    in6_addr v6{};
    if (::inet_pton(AF_INET6, ep.host.c_str(), &v6) != 1) {
      if (problem != nullptr && !ep.host.empty()) {
        const bool v4 = slurm::is_dotted_quad(ep.host);
        *problem = slurm::quoted_for_message(text) + ": brackets hold an IPv6 address";
        if (v4 || slurm::host_name_problem(ep.host).empty()) {
          *problem += std::string("; write ") + (v4 ? "an IPv4 address" : "a host name") + " without them (" +
                      ep.host + ":" + std::string(port_text) + ")";
        }
      }
      return std::nullopt;
    }
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return std::nullopt;
    ep.host = std::string(text.substr(0, colon));
    if (ep.host.find(':') != std::string::npos) return std::nullopt;
    port_text = text.substr(colon + 1);
  }
  if (ep.host.empty()) ep.host = "0.0.0.0";
  // Digits and dots only: an IPv4 address, and as a dotted quad. 256.1.1.1 is none, nor a name
  // to look up; inet_aton reads 1.2.3 and 127.1 too, but nothing after it did: 1.2.3 failed
  // only at the bind, and 127.1 was taken for a host name.
  if (std::all_of(ep.host.begin(), ep.host.end(), [](char ch) { return std::isdigit(static_cast<unsigned char>(ch)) || ch == '.'; }) &&
      !slurm::is_dotted_quad(ep.host)) {
    if (problem != nullptr) {
      *problem = slurm::quoted_for_message(ep.host) +
                 " is not an IPv4 address: a host of digits and dots must be a dotted quad (four numbers 0-255 "
                 "without leading zeros)";
    }
    return std::nullopt;
  }
  for (char ch : ep.host) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-' || ch == '_' || ch == ':')) {
      return std::nullopt;
    }
  }
  auto port = parse_integer(port_text);
  if (!port || *port < 0 || *port > 65535) return std::nullopt;
  ep.port = static_cast<std::uint16_t>(*port);
  return ep;
}

std::optional<Endpoint> parse_backend_url(std::string_view url, std::string* problem) {
  constexpr std::string_view kScheme = "http://";
  auto rest = url;
  const auto lower = [](std::string_view text) {
    std::string out(text);
    for (auto& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return out;
  };
  if (lower(rest.substr(0, kScheme.size())) == kScheme) {  // schemes are case-insensitive (RFC 3986)
    rest.remove_prefix(kScheme.size());
  } else if (rest.find("://") != std::string_view::npos) {
    *problem = "only http:// is supported";
    return std::nullopt;
  }
  while (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
  std::string why;
  auto ep = parse_endpoint(rest, &why);
  // parse_endpoint reads an empty host as every interface, which is no backend's address.
  if (!ep || ep->port == 0 || rest.empty() || rest.front() == ':') {
    if (why.empty()) {
      // Say what is wrong: a path, the host, or the port (after the host's last ':', past an
      // IPv6 address's ']').
      const auto bracket = rest.find(']');
      const auto colon = rest.rfind(':');
      const bool has_port = !rest.empty() && rest.front() != ':' && colon != std::string_view::npos &&
                            (bracket == std::string_view::npos || colon > bracket);
      const auto host = has_port ? rest.substr(0, colon) : rest;
      if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
        why = "a backend URL is http://host:port, without a path (" + slurm::quoted_for_message(rest.substr(slash)) + ")";
      } else if (bracket == std::string_view::npos && rest.find(':') != colon) {
        why = "an IPv6 address goes in brackets: http://[address]:port";
      } else if (rest.empty() || rest.front() == ':') {
        why = "no host: expected http://host:port";
      } else if (!rest.empty() && rest.front() != ':' && !has_port) {
        why = "no port: expected http://host:port";
      } else if (bracket != std::string_view::npos && bracket + 1 != colon) {
        why = "expected ':port' right after the IPv6 address's ']'";
      } else if (host.front() != '[' && !slurm::host_name_problem(host).empty()) {
        why = "not a valid host name: " + slurm::host_name_problem(host);
      } else if (ep && ep->port == 0) {
        why = "port 0 is no backend's port (1-65535)";
      } else if (has_port) {
        why = "port " + slurm::quoted_for_message(rest.substr(colon + 1)) + " is not a number from 1 to 65535";
      }
    }
    *problem = why.empty() ? "expected http://host:port" : why;
    return std::nullopt;
  }
  // The rules Slurm's hosts follow: a name that cannot be looked up (an empty label, a label
  // over 63 characters) would be a backend that never becomes healthy, and "127.0.0.010" is
  // 127.0.0.8 to inet_aton. A host in brackets is an IPv6 address, which parse_endpoint checked.
  if (rest.front() != '[') {
    if (auto bad = slurm::host_name_problem(ep->host); !bad.empty()) {
      *problem = "not a valid host name: " + bad;
      return std::nullopt;
    }
  }
  // One server, one id, however its address is written: host names are case-insensitive, and
  // an IPv6 address has one standard text (RFC 5952: ::1, not 0:0:0:0:0:0:0:1).
  if (rest.front() == '[') {
    in6_addr v6{};
    std::array<char, INET6_ADDRSTRLEN> text{};
    if (::inet_pton(AF_INET6, ep->host.c_str(), &v6) == 1 && ::inet_ntop(AF_INET6, &v6, text.data(), text.size()) != nullptr) {
      ep->host = text.data();
    }
  } else {
    ep->host = lower(ep->host);
  }
  return ep;
}

int Config::effective_threads() const {
  if (threads > 0) return threads;
  // The CPUs this process may run on: an `srun -c 2` step (or taskset, or a container's cpuset)
  // gets 2 workers, not one per CPU of the whole machine.
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (::sched_getaffinity(0, sizeof allowed, &allowed) == 0) {
    const int n = CPU_COUNT(&allowed);
    if (n > 0) return n;
  }
  auto hw = static_cast<int>(std::thread::hardware_concurrency());
  return hw > 0 ? hw : 1;
}

const std::vector<KeyInfo>& known_keys() {
  static const std::vector<KeyInfo> keys = [] {
    std::vector<KeyInfo> out;
    Config defaults;
    for (const auto& spec : specs()) {
      out.push_back(KeyInfo{spec.key, env_name(spec.key), spec.get(defaults), spec.help});
    }
    return out;
  }();
  return keys;
}

namespace {

// The candidate key nearest to `query` when both are spelt by `spell` (the identity for YAML
// keys; upper case with underscores for environment variables), or empty when nothing is close.
template <typename Spell>
std::string nearest_key(std::string_view query, const std::vector<std::string>& candidates,
                        Spell spell) {
  std::string best;
  std::size_t best_distance = std::string::npos;
  for (const auto& key : candidates) {
    auto d = edit_distance(query, spell(key));
    // Also compare against the last component, so "interval" suggests "health.interval".
    auto dot = key.rfind('.');
    if (dot != std::string::npos)
      d = std::min(d, edit_distance(query, spell(key.substr(dot + 1))) + 1);
    if (d < best_distance) {
      best_distance = d;
      best = key;
    }
  }
  if (best_distance > std::max<std::size_t>(2, query.size() / 3)) return {};
  return best;
}

std::vector<std::string> spec_keys() {
  std::vector<std::string> keys;
  for (const auto& spec : specs()) keys.push_back(spec.key);
  return keys;
}

}  // namespace

std::string closest_key(std::string_view key) {
  return nearest_key(key, spec_keys(), [](const std::string& k) { return k; });
}

std::string closest_env_name(std::string_view name) {
  std::string query(name.substr(0, kEnvPrefix.size()) == kEnvPrefix ? name.substr(kEnvPrefix.size())
                                                                    : name);
  // Case-insensitive, so "INFERGATE_health_interval" still finds its key.
  for (auto& ch : query) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  auto candidates = spec_keys();
  candidates.emplace_back("config");  // INFERGATE_CONFIG names the file; it is no key
  auto best = nearest_key(query, candidates, [](const std::string& k) {
    return env_name(k).substr(kEnvPrefix.size());
  });
  return best.empty() ? std::string() : env_name(best);
}

Config parse_yaml_text(std::string_view yaml, std::string_view file_name) {
  Config c;
  parse_yaml_into(c, yaml, file_name);
  validate(c);
  return c;
}

LoadResult load_config(const LoadOptions& options) {
  LoadResult result;
  Config& c = result.config;
  EnvLookup env = options.env ? options.env : EnvLookup(process_env);

  std::optional<std::string> file = options.config_file;
  if (!file) {
    auto from_env = env("INFERGATE_CONFIG");
    if (from_env && !from_env->empty()) file = *from_env;
  }
  if (file) {
    parse_yaml_into(c, read_config_file(*file), *file);
    c.config_file = *file;
  }

  for (const auto& spec : specs()) {
    auto name = env_name(spec.key);
    auto value = env(name);
    if (!value) continue;
    if (spec.kind == Kind::kList) spec.clear(c);
    auto err = spec.set(c, *value);
    if (!err.empty()) throw ConfigError("environment " + name + ": " + spec.key + ": " + err);
    c.sources[spec.key] = Source::kEnv;
  }

  std::set<std::string> cleared_lists;
  for (const auto& flag : options.flags) {
    const KeySpec* spec = find_spec(flag.key);
    if (!spec) throw ConfigError(flag.flag + ": " + unknown_key_message(flag.key));
    if (spec->kind == Kind::kList && cleared_lists.insert(spec->key).second) spec->clear(c);
    auto err = spec->set(c, flag.value);
    if (!err.empty()) {
      // "--set timeouts.connect: ...", or "--threads: threads: ..." where the flag is not the key.
      const bool flag_names_key = flag.flag == "--set " + spec->key;
      throw ConfigError(flag.flag + ": " + (flag_names_key ? "" : spec->key + ": ") + err);
    }
    c.sources[spec->key] = Source::kFlag;
  }

  validate(c);

  EnvNames names = options.env_names;
  if (!names && !options.env) names = process_env_names;
  if (names) result.warnings = unknown_env_warnings(names());
  return result;
}

std::string dump_config(const Config& config) {
  std::ostringstream out;
  if (!config.config_file.empty()) out << "# config file: " << config.config_file << "\n";
  std::string section;
  for (const auto& spec : specs()) {
    auto dot = spec.key.find('.');
    std::string this_section = dot == std::string::npos ? "" : spec.key.substr(0, dot);
    std::string leaf = dot == std::string::npos ? spec.key : spec.key.substr(dot + 1);
    if (this_section != section) {
      section = this_section;
      if (!section.empty()) out << section << ":\n";
    }
    auto it = config.sources.find(spec.key);
    auto source = it == config.sources.end() ? Source::kDefault : it->second;
    auto value = spec.get(config);
    // Text values are printed so that the output, given back as --config, means the same: getters
    // that may say "null" (unset) or quote already are left alone.
    const bool quoted = !value.empty() && value.front() == '"';
    if ((spec.kind == Kind::kString || spec.kind == Kind::kEndpoint) && value != "null" && !quoted &&
        needs_yaml_quotes(value)) {
      value = yaml_quoted(value);
    }
    out << (section.empty() ? "" : "  ") << leaf << ": " << value << "  # " << to_string(source) << "\n";
  }
  return out.str();
}

}  // namespace infergate::config
