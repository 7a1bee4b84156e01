// The one configuration model: defaults < YAML file < INFERGATE_* environment < CLI flags.
// Every key is declared once in a table (config.cpp) that drives parsing, validation,
// `infergate config` output and the unknown-key suggestions.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace infergate::config {

using std::chrono::milliseconds;

// A configuration error. what() is one line naming the key and where the value came from
// (file and line, environment variable or flag).
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Source { kDefault, kFile, kEnv, kFlag };
std::string_view to_string(Source source);

struct Endpoint {
  std::string host;
  std::uint16_t port = 0;
  std::string to_string() const;
};
// "HOST:PORT", ":PORT" (all interfaces) or "[v6]:PORT"; a HOST of digits and dots must be a
// dotted quad. nullopt when malformed, with `*problem` set (when given) where more can be said
// than "expected HOST:PORT" ("[127.0.0.1]:80": brackets hold an IPv6 address; "1.2.3").
std::optional<Endpoint> parse_endpoint(std::string_view text, std::string* problem = nullptr);
// A backend's URL, "http://HOST:PORT" (the scheme may be left out; trailing '/' are ignored),
// as its endpoint. The host is a host name by the rules Slurm's hosts follow
// (slurm::host_name_problem), a dotted-quad IPv4 address or "[v6]". nullopt with `*problem`
// set (e.g. "not a valid host name: empty label at offset 2 (...)") when it is not one.
std::optional<Endpoint> parse_backend_url(std::string_view url, std::string* problem);

struct SlurmSettings {
  bool enabled = true;
  std::optional<std::string> nodelist;
  std::optional<int> training_nodes;
  std::optional<int> infer_tp;
  std::optional<int> gpus_per_node;
  int base_port = 9000;
  std::string host_suffix;
  std::string domain;
  std::optional<int> het_group;
  bool use_scontrol = false;
  milliseconds scontrol_timeout{5000};
};

struct HealthSettings {
  std::string path = "/health";
  milliseconds interval{2000};
  milliseconds timeout{2000};
  int healthy_threshold = 2;
  int unhealthy_threshold = 3;
  int min_healthy_backends = 1;
};

struct PassiveSettings {
  int failures = 3;
  milliseconds ejection_base{1000};
  milliseconds ejection_max{60000};
};

struct TimeoutSettings {
  milliseconds connect{5000};
  milliseconds first_byte{600000};
  milliseconds idle{300000};
  // Whole exchange, retries included, from the request's arrival to the response's last byte;
  // 0: no limit (a long generation is legitimate; the idle and first-byte timeouts catch hangs).
  milliseconds total{0};
  milliseconds client_header{30000};
  milliseconds client_idle{120000};
  // With the 1 s to answer what is left, within Slurm's default KillWait (30 s between the
  // SIGTERM of a job's end or scancel and its SIGKILL).
  milliseconds shutdown{25000};
  // How long a request waits in the gateway's queue for a backend with room
  // (limits.max_inflight_per_backend); 503 after it.
  milliseconds queue{300000};
  // How long a request waits for a healthy backend when none is (servers loading weights, or
  // all restarting); 503 after it. 0: the 503 at once.
  milliseconds no_healthy_backend{0};
};

struct LimitSettings {
  std::uint64_t max_body = 64ULL * 1024 * 1024;
  std::uint64_t max_header = 64ULL * 1024;
  int upstream_idle_per_backend = 64;
  // Open client connections the gateway holds at once; further clients wait in the listen
  // backlog. 0: derived from the open-file limit (two descriptors per proxied request).
  int max_client_connections = 0;
  // Request-body bytes held at once across all connections (bodies over 64 KiB count); a body
  // that would go past it is answered 503 with Retry-After. 0: a quarter of the memory the
  // gateway may use (physical memory or its cgroup's limit), and never below max_body.
  std::uint64_t max_body_memory = 0;
  // Below uvicorn's 5 s keep-alive (vLLM, SGLang): a parked connection the backend may be
  // closing as a request arrives is not reused.
  milliseconds upstream_idle_timeout{4000};
  // Requests one backend takes at once (like the per-server semaphores of a trainer's own load
  // balancer); further requests wait in the gateway's queue. 0: no limit.
  int max_inflight_per_backend = 0;
  // Requests that may wait in that queue; 429 beyond it.
  int max_queued = 4096;
};

struct RetrySettings {
  int max = 3;
  milliseconds backoff_base{25};
  milliseconds backoff_max{1000};
  // Retry a request the backend received in full but never answered (connection closed or
  // reset, or no answer within timeouts.first_byte). False: a request that crashes its server
  // reaches only that one.
  bool after_sent = true;
};

struct LogSettings {
  std::string level = "info";
  std::string format = "text";
  bool access = true;
};

struct Config {
  Endpoint listen{"0.0.0.0", 8080};
  int threads = 0;  // 0: one per hardware thread
  std::vector<std::string> backends;
  SlurmSettings slurm;
  HealthSettings health;
  PassiveSettings passive;
  TimeoutSettings timeouts;
  LimitSettings limits;
  RetrySettings retries;
  std::string policy = "round_robin";
  std::string admin_token;
  LogSettings log;
  std::optional<Endpoint> metrics_listen;

  std::string config_file;                 // empty when none was read
  std::map<std::string, Source> sources;   // key -> where its value came from
  std::map<std::string, int> file_lines;   // key -> its line in config_file, for keys from the file

  int effective_threads() const;
};

// Values given on the command line, by key (e.g. {"listen", "127.0.0.1:0"}); `flag` is how the
// user spelled it, for error messages. Repeated keys of list type accumulate.
struct FlagValue {
  std::string key;
  std::string value;
  std::string flag;
};

using EnvLookup = std::function<std::optional<std::string>(std::string_view)>;

// The names of all environment variables, to find misspelt INFERGATE_* ones.
using EnvNames = std::function<std::vector<std::string>()>;

struct LoadOptions {
  std::optional<std::string> config_file;  // --config; else INFERGATE_CONFIG
  std::vector<FlagValue> flags;
  EnvLookup env;                           // defaults to the process environment when empty
  // Defaults to the process environment's names when `env` is empty too; with a custom `env`
  // and no `env_names`, unknown variables are not looked for.
  EnvNames env_names;
};

struct LoadResult {
  Config config;
  // One line each, for the caller to log: every INFERGATE_* environment variable that is not a
  // configuration key (nor INFERGATE_CONFIG or one of the scripts' variables), with the nearest
  // known name when one is close.
  std::vector<std::string> warnings;
};

// Throws ConfigError.
LoadResult load_config(const LoadOptions& options);

// Parses YAML text as if read from `file_name` on top of the defaults (for tests and --check).
Config parse_yaml_text(std::string_view yaml, std::string_view file_name);

// The effective configuration as YAML, each value followed by a comment naming its source.
std::string dump_config(const Config& config);

struct KeyInfo {
  std::string key;
  std::string env;      // INFERGATE_...
  std::string default_value;
  std::string help;
};
const std::vector<KeyInfo>& known_keys();

// The known key closest to `key` (edit distance), or empty when nothing is close.
std::string closest_key(std::string_view key);

// The known INFERGATE_* variable closest to `name` (e.g. INFERGATE_HEALTH_INTERVL ->
// INFERGATE_HEALTH_INTERVAL), or empty when nothing is close.
std::string closest_env_name(std::string_view name);

}  // namespace infergate::config
