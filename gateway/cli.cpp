#include "gateway/cli.hpp"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "discovery/discovery.hpp"
#include "discovery/resolve.hpp"
#include "gateway/server.hpp"

#ifndef INFERGATE_VERSION
#define INFERGATE_VERSION "0.0.0"
#endif

namespace infergate::gateway {
namespace {

struct FlagSpec {
  const char* flag;
  const char* key;  // config key; nullptr for flags handled here
  const char* arg;  // nullptr: takes no value
  const char* help;
};

constexpr FlagSpec kFlags[] = {
    {"--config", nullptr, "FILE", "YAML configuration file (also INFERGATE_CONFIG)"},
    {"--listen", "listen", "HOST:PORT", "listen address (default 0.0.0.0:8080)"},
    {"--threads", "threads", "N", "worker threads (default 0: one per CPU this process may run on)"},
    {"--backend", "backends", "URL", "static backend http://host:port (repeatable)"},
    {"--no-slurm", "slurm.enabled", nullptr, "do not discover backends from the Slurm environment"},
    {"--log-level", "log.level", "LEVEL", "trace, debug, info, warn (or warning), error, critical, off"},
    {"--log-format", "log.format", "FORMAT", "text or json"},
    {"--set", nullptr, "KEY=VALUE", "set any configuration key (see `infergate config`)"},
    {"--json", nullptr, nullptr, "discover: print JSON objects instead of URLs"},
    {"--help", nullptr, nullptr, "print this help and exit (also -h)"},
    {"--version", nullptr, nullptr, "print the version and exit"},
};

const FlagSpec* find_flag(std::string_view name) {
  for (const auto& f : kFlags) {
    if (name == f.flag) return &f;
  }
  return nullptr;
}

// The message as a JSON string's contents: log lines carry request targets and ids, which must
// not be able to end the string and add keys of their own.
// The length of the well-formed UTF-8 sequence at the start of `s` (RFC 3629: no overlong
// forms, no surrogates, nothing past U+10FFFF), or 0.
std::size_t utf8_sequence_length(std::string_view s) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  const auto lead = byte(0);
  std::size_t n = 0;
  unsigned char low = 0x80, high = 0xbf;  // the range of the second byte
  if (lead >= 0xc2 && lead <= 0xdf) {
    n = 2;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    n = 3;
    if (lead == 0xe0) low = 0xa0;
    if (lead == 0xed) high = 0x9f;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    n = 4;
    if (lead == 0xf0) low = 0x90;
    if (lead == 0xf4) high = 0x8f;
  } else {
    return 0;
  }
  if (s.size() < n || byte(1) < low || byte(1) > high) return 0;
  for (std::size_t i = 2; i < n; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xbf) return 0;
  }
  return n;
}

void append_json_escaped(std::string_view text, spdlog::memory_buf_t& out) {
  static constexpr char kHex[] = "0123456789abcdef";
  const auto put = [&out](std::string_view piece) { out.append(piece.data(), piece.data() + piece.size()); };
  for (std::size_t i = 0; i < text.size();) {
    const auto u = static_cast<unsigned char>(text[i]);
    if (u == '"' || u == '\\') {
      const char escaped[] = {'\\', text[i]};
      put({escaped, 2});
      ++i;
    } else if (u < 0x20 || u == 0x7f) {
      const char escaped[] = {'\\', 'u', '0', '0', kHex[u >> 4], kHex[u & 15]};
      put({escaped, 6});
      ++i;
    } else if (u < 0x80) {
      put(text.substr(i, 1));
      ++i;
    } else if (const auto n = utf8_sequence_length(text.substr(i)); n != 0) {
      put(text.substr(i, n));
      i += n;
    } else {
      put("\\ufffd");  // a byte that is not UTF-8 (JSON text must be): the replacement character
      ++i;
    }
  }
}

class JsonEscapedMessage final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    append_json_escaped(std::string_view(msg.payload.data(), msg.payload.size()), dest);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<JsonEscapedMessage>(); }
};

void setup_logging(const config::Config& cfg) {
  auto logger = spdlog::stderr_color_mt("infergate");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(cfg.log.level));
  if (cfg.log.format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<JsonEscapedMessage>('*').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","thread":%t,"msg":"%*"})");
    spdlog::set_formatter(std::move(formatter));
  } else {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  }
}

// Thousands of concurrent streams need thousands of descriptors: use the hard limit.
// Two descriptors per proxied stream (client and backend): raise the hard limit too when
// allowed (root), since 10,000 streams need more than a common 20,000 cap.
void raise_fd_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  constexpr rlim_t kWanted = 1 << 17;
  if (limit.rlim_max < kWanted) {
    rlimit raised{kWanted, kWanted};
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) return;
  }
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
}

int print_discovery(const discovery::DiscoveryResult& result, bool json) {
  if (json) {
    auto out = nlohmann::json::array();
    for (const auto& b : result.backends) {
      out.push_back({{"id", b.id}, {"url", b.url}, {"node", b.node}, {"slot", b.slot}, {"source", b.source}});
    }
    std::cout << out.dump(2) << "\n";
  } else {
    for (const auto& b : result.backends) std::cout << b.url << "\n";
  }
  // As grep does: a script can tell "nothing found" (1) from a bad environment (2).
  return result.backends.empty() ? 1 : 0;
}

}  // namespace

namespace {

// `--listen $(hostname):8080` on a node whose /etc/hosts maps its own name to 127.0.1.1 (Debian's
// default) listens where no other node can connect: say so, since the trainer may run elsewhere.
void warn_if_loopback_name(const std::string& host, const std::string& address) {
  if (host == address || host == "localhost" || host.starts_with("ip6-")) return;
  if (address.starts_with("127.") || address == "::1") {
    spdlog::warn("listen: '{}' resolves to the loopback address {}: only this node can connect; listen on 0.0.0.0 "
                 "(or the node's network address) for other nodes' trainers",
                 host, address);
  }
}

std::optional<Command> command_named(std::string_view word) {
  if (word == "serve") return Command::kServe;
  if (word == "discover") return Command::kDiscover;
  if (word == "config") return Command::kConfig;
  if (word == "help") return Command::kHelp;
  return std::nullopt;
}

}  // namespace

CliArgs parse_args(const std::vector<std::string>& args) {
  CliArgs out;
  bool command_given = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    // The command may come after flags too (`infergate --config f.yaml discover`), once.
    if (!args[i].empty() && args[i][0] != '-') {
      auto command = command_named(args[i]);
      if (!command && i == 0) {
        throw config::ConfigError("unknown command '" + args[i] + "' (expected serve, discover, config; see --help)");
      }
      if (!command) throw config::ConfigError("unexpected argument '" + args[i] + "' (see infergate --help)");
      if (command_given) {
        throw config::ConfigError("two commands, '" + std::string(args[i]) + "' and an earlier one (see --help)");
      }
      if (out.command != Command::kHelp && out.command != Command::kVersion) out.command = *command;
      command_given = true;
      continue;
    }
    std::string name = args[i] == "-h" ? std::string("--help") : args[i];
    std::optional<std::string> inline_value;
    if (auto eq = name.find('='); eq != std::string::npos && name.rfind("--", 0) == 0) {
      inline_value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    const FlagSpec* spec = find_flag(name);
    if (!spec) {
      throw config::ConfigError("unknown flag '" + name + "' (see infergate --help)");
    }
    std::string value;
    if (spec->arg) {
      if (inline_value) {
        value = *inline_value;
      } else if (i + 1 < args.size()) {
        value = args[++i];
        // `--threads --listen X`: the value is missing, not "--listen".
        if (value.rfind("--", 0) == 0 && find_flag(value.substr(0, value.find('='))) != nullptr) {
          throw config::ConfigError(name + ": missing value " + spec->arg + " (the next argument is the flag " +
                                    value.substr(0, value.find('=')) + ")");
        }
      } else {
        throw config::ConfigError(name + ": missing value " + spec->arg);
      }
    } else if (inline_value) {
      throw config::ConfigError(name + " takes no value");
    }
    if (name == "--help") {
      out.command = Command::kHelp;
    } else if (name == "--version") {
      out.command = Command::kVersion;
    } else if (name == "--json") {
      out.json = true;
    } else if (name == "--config") {
      if (out.load.config_file) {
        // Not layered: one file is read. (A setting given by two flags takes the last, so that
        // a wrapper's defaults can be overridden by its caller's arguments.)
        throw config::ConfigError("--config given twice ('" + *out.load.config_file + "' and '" + value +
                                  "'): the gateway reads one file");
      }
      out.load.config_file = value;
    } else if (name == "--no-slurm") {
      out.load.flags.push_back({"slurm.enabled", "false", name});
    } else if (name == "--set") {
      auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0) {
        throw config::ConfigError("--set: expected KEY=VALUE, got '" + value + "'");
      }
      out.load.flags.push_back({value.substr(0, eq), value.substr(eq + 1), "--set " + value.substr(0, eq)});
    } else {
      out.load.flags.push_back({spec->key, value, name});
    }
  }
  if (out.json && (out.command == Command::kServe || out.command == Command::kConfig)) {
    throw config::ConfigError("--json applies to discover only");
  }
  return out;
}

std::string help_text() {
  std::string out =
      "infergate: a load-balancing gateway for inference servers in a Slurm job\n\n"
      "usage: infergate [serve|discover|config] [flags]\n"
      "  serve     proxy requests to the discovered backends (default)\n"
      "  discover  print the backends the gateway would use, one URL per line\n"
      "  config    print the effective configuration with the source of each value\n\nflags:\n";
  for (const auto& f : kFlags) {
    std::string left = std::string("  ") + f.flag + (f.arg ? std::string(" ") + f.arg : "");
    left.resize(std::max<std::size_t>(left.size() + 1, 24), ' ');
    out += left + f.help + "\n";
  }
  out += "\nEvery configuration key also reads INFERGATE_<KEY> (dots become underscores),\n"
         "e.g. INFERGATE_HEALTH_INTERVAL=5s. Precedence: flags > environment > file > defaults.\n";
  return out;
}

// A YAML comment line: text from the environment may hold line breaks (a value read from a
// file), which would end the comment and leave the rest to be read as YAML.
std::string comment_line(std::string_view text) {
  std::string line = "#";
  for (const char ch : text) {
    if (ch == '\n') {
      line += "\\n";
    } else if (ch == '\r') {
      line += "\\r";
    } else {
      line += ch;
    }
  }
  return line + "\n";
}

// For `infergate config`: the slurm.* keys left null take their values from the job's
// environment at start-up; say which, as YAML comments so the output still loads as --config.
std::string slurm_comment(const config::Config& cfg) {
  if (!cfg.slurm.enabled) return {};
  std::string out;
  try {
    const auto found = discovery::discover(cfg, config::EnvLookup{});
    if (found.slurm.empty()) return comment_line(" Slurm job: " + found.how.substr(0, found.how.find("; ")));
    out = comment_line(" Slurm job, as the environment resolves the slurm.* keys above:");
    for (const auto& s : found.slurm) out += comment_line("   " + s.name + ": " + s.value + "  (" + s.source + ")");
  } catch (const std::exception& e) {
    std::cerr << "infergate: warning: " << e.what() << "\n";
    out = comment_line(std::string(" Slurm job: cannot be read: ") + e.what());
  }
  return out;
}

std::string version_text() { return std::string("infergate ") + INFERGATE_VERSION + "\n"; }

int run_cli(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  CliArgs cli;
  config::LoadResult loaded;
  try {
    cli = parse_args(args);
    if (cli.command == Command::kHelp) {
      std::cout << help_text();
      return 0;
    }
    if (cli.command == Command::kVersion) {
      std::cout << version_text();
      return 0;
    }
    loaded = config::load_config(cli.load);
  } catch (const std::exception& e) {
    std::cerr << "infergate: " << e.what() << "\n";
    return 2;
  }
  const auto& cfg = loaded.config;
  if (cli.command == Command::kConfig || cli.command == Command::kDiscover) {
    // These commands print and exit before logging is set up: say the warnings on stderr.
    for (const auto& w : loaded.warnings) std::cerr << "infergate: warning: " << w << "\n";
  }
  if (cli.command == Command::kConfig) {
    std::cout << config::dump_config(cfg) << slurm_comment(cfg);
    return 0;
  }

  if (cli.command == Command::kServe) {
    // Before discovery, so that its warnings and its error are written as the log is.
    setup_logging(cfg);
    for (const auto& w : loaded.warnings) spdlog::warn("{}", w);
  }
  discovery::DiscoveryResult discovered;
  try {
    discovered = discovery::discover(cfg, config::EnvLookup{});
  } catch (const std::exception& e) {
    if (cli.command == Command::kServe && cfg.log.format == "json" &&
        spdlog::default_logger()->should_log(spdlog::level::critical)) {
      // The line saying why the job's gateway did not start, where a JSON log pipeline reads it.
      spdlog::critical("{}", e.what());
    } else {
      std::cerr << "infergate: " << e.what() << "\n";
    }
    return 2;
  }
  if (cli.command == Command::kDiscover) {
    for (const auto& note : discovered.notes) std::cerr << "infergate: " << note << "\n";  // stdout stays parseable
    for (const auto& warning : discovered.warnings) std::cerr << "infergate: warning: " << warning << "\n";
    if (discovered.backends.empty()) std::cerr << "infergate: no backends found (" << discovered.how << ")\n";
    return print_discovery(discovered, cli.json);
  }

  raise_fd_limit();
  std::signal(SIGPIPE, SIG_IGN);
  // Ignored from the start: the server's handler (which logs it) is installed only when it runs,
  // after the listening line a script may already have acted on.
  std::signal(SIGHUP, SIG_IGN);
  for (const auto& note : discovered.notes) spdlog::info("{}", note);
  for (const auto& warning : discovered.warnings) spdlog::warn("{}", warning);
  if (discovered.backends.empty()) {
    spdlog::warn("no backends found ({}); requests get 503 until some are added", discovered.how);
  } else {
    spdlog::info("{} backend(s): {}{}", discovered.backends.size(), discovered.backends.front().url,
                 discovered.backends.size() > 1 ? " ... " + discovered.backends.back().url : "");
  }
  try {
    Server server(cfg, std::move(discovered));
    server.bind();
    // The address as a URL's authority: an IPv6 host in brackets.
    const auto listening = config::Endpoint{cfg.listen.host, server.port()}.to_string();
    spdlog::info("infergate {} serving on {}{} with {} thread(s)", INFERGATE_VERSION, listening,
                 server.address() == cfg.listen.host ? "" : " (" + server.address() + ")", cfg.effective_threads());
    warn_if_loopback_name(cfg.listen.host, server.address());
    // Scripts and tests wait for this line on stdout.
    std::printf("infergate listening on http://%s\n", listening.c_str());
    if (server.metrics_port() != 0) {
      const auto metrics = config::Endpoint{cfg.metrics_listen->host, server.metrics_port()}.to_string();
      spdlog::info("metrics on {}/metrics", metrics);
      std::printf("infergate metrics on http://%s/metrics\n", metrics.c_str());
    }
    std::fflush(stdout);
    const int code = server.run();
    if (const int lookups = discovery::lookups_in_flight(); lookups > 0) {
      // Destroying the server joins Asio's lookup threads, and a lookup whose name server does
      // not answer would hold the exit for as long as resolv.conf allows. All else is done.
      spdlog::warn("{} DNS lookup(s) still unanswered; exiting without waiting for them", lookups);
      spdlog::shutdown();
      std::fflush(stdout);
      std::_Exit(code);
    }
    return code;
  } catch (const std::exception& e) {
    spdlog::critical("{}", e.what());
    return 1;
  }
}

std::string json_escaped(std::string_view text) {
  spdlog::memory_buf_t out;
  append_json_escaped(text, out);
  return {out.data(), out.size()};
}

}  // namespace infergate::gateway
