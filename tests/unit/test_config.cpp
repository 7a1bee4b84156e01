#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sched.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "config/config.hpp"
#include "config/units.hpp"

using namespace infergate::config;
using namespace std::chrono_literals;
using ::testing::HasSubstr;

namespace {

EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](std::string_view name) -> std::optional<std::string> {
    auto it = vars.find(std::string(name));
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

class TempFile {
 public:
  explicit TempFile(const std::string& content) {
    path_ = std::filesystem::temp_directory_path() /
            ("infergate-config-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++) + ".yaml");
    std::ofstream(path_) << content;
  }
  ~TempFile() { std::filesystem::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
  static inline int counter_ = 0;
};

std::string load_error(const LoadOptions& options) {
  try {
    load_config(options);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

std::string yaml_error(const std::string& yaml) {
  try {
    parse_yaml_text(yaml, "gw.yaml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST(UnitsTest, Durations) {
  EXPECT_EQ(parse_duration("250ms"), 250ms);
  EXPECT_EQ(parse_duration("2s"), 2000ms);
  EXPECT_EQ(parse_duration("5m"), 300000ms);
  EXPECT_EQ(parse_duration("1h"), 3600000ms);
  EXPECT_EQ(parse_duration("3"), 3000ms);
  EXPECT_EQ(parse_duration("1.5s"), 1500ms);
  EXPECT_EQ(parse_duration("0"), 0ms);
  EXPECT_FALSE(parse_duration(""));
  EXPECT_FALSE(parse_duration("abc"));
  EXPECT_FALSE(parse_duration("5 parsecs"));
  EXPECT_FALSE(parse_duration("-1s"));
  EXPECT_FALSE(parse_duration("1e400h"));
}

// Deadlines are steady_clock nanoseconds: a longer duration would wrap into the past.
TEST(UnitsTest, DurationsAboveTenYearsAreRejected) {
  EXPECT_EQ(kMaxDuration, 87600h);
  EXPECT_EQ(parse_duration("87600h"), kMaxDuration);
  EXPECT_EQ(parse_duration(std::to_string(kMaxDuration.count()) + "ms"), kMaxDuration);
  EXPECT_FALSE(parse_duration(std::to_string(kMaxDuration.count() + 1) + "ms"));
  EXPECT_FALSE(parse_duration("87601h"));
  EXPECT_FALSE(parse_duration("9999999999"));  // seconds: 317 years
  EXPECT_FALSE(parse_duration("99999999999999999999999999999h"));
  EXPECT_EQ(duration_error("2s"), "");
  EXPECT_EQ(duration_error("9999999999"),
            "duration '9999999999' is longer than the maximum of 87600h (10 years)");
  EXPECT_THAT(duration_error("soon"), HasSubstr("invalid duration 'soon'"));
  // The wrap the limit prevents: the largest accepted value still fits a nanosecond deadline.
  const auto now = std::chrono::steady_clock::now();
  EXPECT_GT(now + kMaxDuration * 2, now);
}

TEST(UnitsTest, Sizes) {
  EXPECT_EQ(parse_size("64KiB"), 65536u);
  EXPECT_EQ(parse_size("64MiB"), 64u * 1024 * 1024);
  EXPECT_EQ(parse_size("1GiB"), 1024u * 1024 * 1024);
  EXPECT_EQ(parse_size("1000"), 1000u);
  EXPECT_EQ(parse_size("2MB"), 2000000u);
  EXPECT_FALSE(parse_size("64 lots"));
  EXPECT_FALSE(parse_size("MiB"));
  EXPECT_FALSE(parse_size("-5"));
  // Fractions of a unit that come to whole bytes are taken; fractions of a byte are not.
  EXPECT_EQ(parse_size("1.5MiB"), 3u * 512 * 1024);
  EXPECT_EQ(parse_size("1.1MB"), 1100000u);
  EXPECT_FALSE(parse_size("1.5"));
  EXPECT_FALSE(parse_size("0.5B"));
  EXPECT_FALSE(parse_size("1.0001KiB"));
}

TEST(UnitsTest, FormatRoundTrips) {
  EXPECT_EQ(format_duration(250ms), "250ms");
  EXPECT_EQ(format_duration(2000ms), "2s");
  EXPECT_EQ(format_duration(300000ms), "5m");
  EXPECT_EQ(format_duration(3600000ms), "1h");
  EXPECT_EQ(format_size(64u * 1024 * 1024), "64MiB");
  EXPECT_EQ(format_size(65536), "64KiB");
  EXPECT_EQ(format_size(1000), "1000");
}

TEST(EndpointTest, Parses) {
  auto ep = parse_endpoint("127.0.0.1:8080");
  ASSERT_TRUE(ep);
  EXPECT_EQ(ep->host, "127.0.0.1");
  EXPECT_EQ(ep->port, 8080);
  EXPECT_EQ(parse_endpoint(":9000")->host, "0.0.0.0");
  EXPECT_EQ(parse_endpoint("[::1]:80")->host, "::1");
  EXPECT_EQ(parse_endpoint("[::1]:80")->to_string(), "[::1]:80");
  EXPECT_EQ(parse_endpoint("gpu-a001:0")->port, 0);
  EXPECT_FALSE(parse_endpoint("localhost"));
  EXPECT_FALSE(parse_endpoint("host:99999"));
  EXPECT_FALSE(parse_endpoint("host:abc"));
  EXPECT_FALSE(parse_endpoint("ho st:80"));
}

// threads: 0 means one worker per CPU this process may run on (an `srun -c 1` step, taskset, a
// cpuset), not per CPU of the machine.
TEST(ConfigTest, AutomaticThreadsFollowTheCpuAffinity) {
  cpu_set_t before;
  CPU_ZERO(&before);
  ASSERT_EQ(::sched_getaffinity(0, sizeof before, &before), 0);
  int first = 0;
  while (first < CPU_SETSIZE && !CPU_ISSET(first, &before)) ++first;
  ASSERT_LT(first, CPU_SETSIZE);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(::sched_setaffinity(0, sizeof one, &one), 0);
  Config c;
  c.threads = 0;
  const int automatic = c.effective_threads();
  ASSERT_EQ(::sched_setaffinity(0, sizeof before, &before), 0);
  EXPECT_EQ(automatic, 1);
  EXPECT_EQ(c.effective_threads(), CPU_COUNT(&before));
  c.threads = 3;
  EXPECT_EQ(c.effective_threads(), 3);
}

TEST(ConfigTest, DefaultsMatchTheDocumentation) {
  auto c = load_config(LoadOptions{{}, {}, env_of({}), {}}).config;
  EXPECT_EQ(c.listen.to_string(), "0.0.0.0:8080");
  EXPECT_EQ(c.threads, 0);
  EXPECT_GE(c.effective_threads(), 1);
  EXPECT_TRUE(c.slurm.enabled);
  EXPECT_EQ(c.slurm.base_port, 9000);
  EXPECT_EQ(c.health.path, "/health");
  EXPECT_EQ(c.health.interval, 2s);
  EXPECT_EQ(c.health.healthy_threshold, 2);
  EXPECT_EQ(c.health.unhealthy_threshold, 3);
  EXPECT_EQ(c.timeouts.connect, 5s);
  EXPECT_EQ(c.timeouts.first_byte, 600s);
  EXPECT_EQ(c.timeouts.idle, 300s);
  EXPECT_EQ(c.timeouts.client_header, 30s);
  EXPECT_EQ(c.timeouts.client_idle, 120s);
  EXPECT_EQ(c.limits.max_body, 64u * 1024 * 1024);
  EXPECT_EQ(c.limits.max_header, 64u * 1024);
  EXPECT_EQ(c.retries.max, 3);
  EXPECT_EQ(c.policy, "round_robin");
  EXPECT_EQ(c.log.level, "info");
  EXPECT_EQ(c.log.format, "text");
}

TEST(ConfigTest, YamlFileSetsNestedKeys) {
  auto c = parse_yaml_text(R"(
listen: 127.0.0.1:9999
threads: 3
backends:
  - http://a:1
  - b:2
slurm:
  base_port: 8000
  domain: cluster.local
health:
  interval: 500ms
limits:
  max_body: 1MiB
log:
  level: debug
)", "gw.yaml");
  EXPECT_EQ(c.listen.to_string(), "127.0.0.1:9999");
  EXPECT_EQ(c.threads, 3);
  EXPECT_THAT(c.backends, ::testing::ElementsAre("http://a:1", "http://b:2"));
  EXPECT_EQ(c.slurm.base_port, 8000);
  EXPECT_EQ(c.slurm.domain, "cluster.local");
  EXPECT_EQ(c.health.interval, 500ms);
  EXPECT_EQ(c.limits.max_body, 1024u * 1024);
  EXPECT_EQ(c.log.level, "debug");
  EXPECT_EQ(c.sources.at("health.interval"), Source::kFile);
}

TEST(ConfigTest, PrecedenceFlagsOverEnvOverFileOverDefaults) {
  TempFile file("threads: 2\nlisten: 127.0.0.1:1000\nretries:\n  max: 5\nlog:\n  level: warn\n");
  LoadOptions options;
  options.config_file = file.path();
  options.env = env_of({{"INFERGATE_THREADS", "4"}, {"INFERGATE_LISTEN", "127.0.0.1:2000"}});
  options.flags.push_back({"listen", "127.0.0.1:3000", "--listen"});
  auto c = load_config(options).config;
  EXPECT_EQ(c.listen.port, 3000);  // flag beats env and file
  EXPECT_EQ(c.sources.at("listen"), Source::kFlag);
  EXPECT_EQ(c.threads, 4);  // env beats file
  EXPECT_EQ(c.sources.at("threads"), Source::kEnv);
  EXPECT_EQ(c.retries.max, 5);  // file beats default
  EXPECT_EQ(c.sources.at("retries.max"), Source::kFile);
  EXPECT_EQ(c.log.level, "warn");
  EXPECT_EQ(c.sources.count("policy"), 0u);  // default
  EXPECT_EQ(c.config_file, file.path());
}

TEST(ConfigTest, ConfigFileFromEnvironment) {
  TempFile file("threads: 7\n");
  auto c = load_config(LoadOptions{{}, {}, env_of({{"INFERGATE_CONFIG", file.path()}}), {}}).config;
  EXPECT_EQ(c.threads, 7);
}

TEST(ConfigTest, FlagBackendsAppendAndReplaceEnvList) {
  LoadOptions options;
  options.env = env_of({{"INFERGATE_BACKENDS", "http://e:1,http://e:2"}});
  auto from_env = load_config(options).config;
  EXPECT_THAT(from_env.backends, ::testing::ElementsAre("http://e:1", "http://e:2"));
  options.flags.push_back({"backends", "http://f:1", "--backend"});
  options.flags.push_back({"backends", "http://f:2", "--backend"});
  auto c = load_config(options).config;
  EXPECT_THAT(c.backends, ::testing::ElementsAre("http://f:1", "http://f:2"));
}

TEST(ConfigTest, UnknownYamlKeySuggestsClosest) {
  auto err = yaml_error("health:\n  intervall: 2s\n");
  EXPECT_THAT(err, HasSubstr("gw.yaml:2"));
  EXPECT_THAT(err, HasSubstr("unknown key 'health.intervall'"));
  EXPECT_THAT(err, HasSubstr("did you mean 'health.interval'"));
  EXPECT_THAT(yaml_error("lisen: 1.2.3.4:5\n"), HasSubstr("did you mean 'listen'"));
  EXPECT_THAT(yaml_error("zzzzzzzzzzzzzzzz: 1\n"), ::testing::Not(HasSubstr("did you mean")));
}

TEST(ConfigTest, InvalidValuesNameKeyFileAndLine) {
  EXPECT_THAT(yaml_error("threads: 1\nhealth:\n  interval: soon\n"),
              HasSubstr("gw.yaml:3: health.interval: invalid duration 'soon'"));
  EXPECT_THAT(yaml_error("threads: many\n"), HasSubstr("gw.yaml:1: threads: expected an integer"));
  EXPECT_THAT(yaml_error("threads: -1\n"), HasSubstr("threads: must be between 0 and 1024"));
  EXPECT_THAT(yaml_error("limits:\n  max_body: big\n"), HasSubstr("gw.yaml:2: limits.max_body: invalid size"));
  EXPECT_THAT(yaml_error("listen: nowhere\n"), HasSubstr("listen: expected HOST:PORT"));
  EXPECT_THAT(yaml_error("backends:\n  - ftp://x:1\n"), HasSubstr("gw.yaml:2: backends: invalid backend URL"));
  EXPECT_THAT(yaml_error("backends: http://x:1\n"), HasSubstr("backends: expected a list"));
  EXPECT_THAT(yaml_error("policy: random\n"), HasSubstr("policy: must be one of round_robin"));
  EXPECT_THAT(yaml_error("log:\n  level: loud\n"), HasSubstr("log.level: must be one of"));
  EXPECT_THAT(yaml_error("log:\n  format: xml\n"), HasSubstr("log.format: must be one of text, json"));
  EXPECT_THAT(yaml_error("slurm:\n  enabled: maybe\n"), HasSubstr("slurm.enabled: expected true or false"));
  EXPECT_THAT(yaml_error("slurm:\n  base_port: 70000\n"), HasSubstr("slurm.base_port: must be between 1 and 65535"));
  EXPECT_THAT(yaml_error("slurm:\n  infer_tp: 0\n"), HasSubstr("slurm.infer_tp: must be between 1"));
  EXPECT_THAT(yaml_error("health:\n  path: health\n"), HasSubstr("health.path: must start with '/'"));
  EXPECT_THAT(yaml_error("health:\n  timeout: 0s\n"), HasSubstr("health.timeout: must be greater than zero"));
  EXPECT_THAT(yaml_error("health: 5\n"), HasSubstr("health: expected a section"));
  // A section with every key under it commented out (as in a template) sets nothing.
  EXPECT_EQ(yaml_error("slurm:\n  # enabled: false\nhealth:\n"), "no error");
  EXPECT_EQ(parse_yaml_text("slurm:\n  # enabled: false\nthreads: 2\n", "gw.yaml").threads, 2);
  EXPECT_THAT(yaml_error("threads: [1, 2]\n"), HasSubstr("threads: expected a single value"));
  EXPECT_THAT(yaml_error("- a\n- b\n"), HasSubstr("expected a YAML map"));
  EXPECT_THAT(yaml_error("threads: [1, 2\n"), HasSubstr("invalid YAML"));
  EXPECT_THAT(yaml_error("limits:\n  max_body: 64MiB\n  max_body_memory: 32MiB\n"),
              HasSubstr("limits.max_body_memory (32MiB, from line 3 of the config file) must be at least limits.max_body (64MiB, "
                        "from line 2 of the config file)"));
  EXPECT_THAT(yaml_error("limits:\n  max_body_memory: lots\n"), HasSubstr("limits.max_body_memory: invalid size 'lots'"));
  EXPECT_THAT(yaml_error("retries:\n  backoff_base: 2s\n  backoff_max: 1s\n"),
              HasSubstr("retries.backoff_max (1s, from line 3 of the config file) must be at least retries.backoff_base "
                        "(2s, from line 2 of the config file)"));
  EXPECT_THAT(yaml_error("passive:\n  ejection_base: 2m\n  ejection_max: 1m\n"),
              HasSubstr("passive.ejection_max"));
  EXPECT_THAT(yaml_error("d: &d {interval: 1s}\nhealth:\n  <<: *d\n"), HasSubstr("unknown key 'd'"));
  EXPECT_THAT(yaml_error("health:\n  <<: {interval: 1s}\n"),
              HasSubstr("unknown key 'health.<<' (YAML merge keys are not supported: write the keys out)"));
  EXPECT_EQ(yaml_error(""), "no error");  // an empty file means defaults
}

TEST(ConfigTest, TooLongDurationsNameKeyOriginAndMaximum) {
  EXPECT_THAT(
      yaml_error("timeouts:\n  idle: 9999999999\n"),
      HasSubstr(
          "gw.yaml:2: timeouts.idle: duration '9999999999' is longer than the maximum of 87600h"));
  EXPECT_THAT(yaml_error("timeouts:\n  shutdown: 100000h\n"),
              HasSubstr("timeouts.shutdown: duration '100000h'"));
  EXPECT_THAT(yaml_error("retries:\n  backoff_max: 87601h\n"),
              HasSubstr("retries.backoff_max: duration"));

  LoadOptions env_bad;
  env_bad.env = env_of({{"INFERGATE_TIMEOUTS_IDLE", "9999999999"}});
  EXPECT_THAT(
      load_error(env_bad),
      HasSubstr(
          "environment INFERGATE_TIMEOUTS_IDLE: timeouts.idle: duration '9999999999' is longer"));

  LoadOptions flag_bad;
  flag_bad.env = env_of({});
  flag_bad.flags.push_back({"passive.ejection_max", "1000000h", "--set passive.ejection_max"});
  EXPECT_THAT(load_error(flag_bad),
              HasSubstr("--set passive.ejection_max: duration '1000000h'"));

  EXPECT_EQ(yaml_error("timeouts:\n  idle: 87600h\n"), "no error");
}

// An error is one line whatever the value holds: control characters in it are escaped.
TEST(ConfigTest, ErrorsQuotingAValueStayOneLine) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {"threads", "1\n2"}, {"policy", "a\nb"}, {"health.path", "/h\nx"}, {"timeouts.idle", "5s\r\n"},
      {"limits.max_body", std::string("1\0x", 3)}, {"listen", "a\tb"}};
  for (const auto& [key, value] : cases) {
    LoadOptions options;
    options.env = env_of({});
    options.flags.push_back({key, value, "--set " + key});
    const auto error = load_error(options);
    EXPECT_EQ(error.find('\n'), std::string::npos) << key << ": " << error;
    EXPECT_EQ(error.find('\r'), std::string::npos) << key << ": " << error;
    EXPECT_EQ(error.find('\0'), std::string::npos) << key << ": " << error;
    EXPECT_THAT(error, HasSubstr("--set " + key)) << error;
  }
  LoadOptions nul;
  nul.env = env_of({});
  nul.flags.push_back({"health.path", std::string("/h\0x", 4), "--set health.path"});
  EXPECT_THAT(load_error(nul), HasSubstr("got '/h\\x00x'"));
}

TEST(ConfigTest, ConfigFileThatIsADirectoryADeviceOrMissingSaysWhy) {
  LoadOptions dir;
  dir.env = env_of({});
  dir.config_file = std::filesystem::temp_directory_path().string();
  EXPECT_EQ(load_error(dir), "cannot read config file '" + *dir.config_file + "': Is a directory");

  LoadOptions dir_from_env;
  dir_from_env.env = env_of({{"INFERGATE_CONFIG", *dir.config_file}});
  EXPECT_THAT(load_error(dir_from_env), HasSubstr("Is a directory"));

  // A device (or an endless pipe) is not read until memory runs out.
  LoadOptions endless;
  endless.env = env_of({});
  endless.config_file = "/dev/zero";
  EXPECT_EQ(load_error(endless), "cannot read config file '/dev/zero': larger than 16MiB (is it a configuration file?)");

  LoadOptions missing;
  missing.env = env_of({});
  missing.config_file = "/nonexistent/infergate.yaml";
  EXPECT_EQ(load_error(missing),
            "cannot read config file '/nonexistent/infergate.yaml': No such file or directory");
}

TEST(ConfigTest, UnknownInfergateVariablesBecomeWarnings) {
  LoadOptions options;
  options.env = env_of({{"INFERGATE_THREADS", "2"}});
  options.env_names = [] {
    return std::vector<std::string>{"PATH",
                                    "INFERGATE_THREADS",    // a key
                                    "INFERGATE_CONFIG",     // the file
                                    "INFERGATE_DEMO_PORT",  // deploy/demo.sh
                                    "INFERGATE_DEMO_BACKEND_PORT",
                                    "INFERGATE_BIN",        // the integration tests
                                    "INFERGATE_MOCK_BIN",
                                    "INFERGATE_HEALTH_INTERVL",  // typos
                                    "INFERGATE_TIMEOUT_IDLE",
                                    "INFERGATE_ZZZZZZZZZZZZZZZZZ",
                                    "INFERGATE_HEALTH_INTERVL",  // once, not twice
                                    "NOT_INFERGATE_THING",
                                    "infergate_threads"};
  };
  auto result = load_config(options);
  EXPECT_EQ(result.config.threads, 2);
  EXPECT_THAT(result.warnings,
              ::testing::ElementsAre(
                  "environment INFERGATE_HEALTH_INTERVL: unknown variable, ignored (did you mean "
                  "INFERGATE_HEALTH_INTERVAL?)",
                  "environment INFERGATE_TIMEOUT_IDLE: unknown variable, ignored (did you mean "
                  "INFERGATE_TIMEOUTS_IDLE?)",
                  "environment INFERGATE_ZZZZZZZZZZZZZZZZZ: unknown variable, ignored"));

  // Without a list of names a custom lookup is not scanned (tests stay independent of the
  // process environment).
  LoadOptions lookup_only;
  lookup_only.env = env_of({{"INFERGATE_BOGUS", "1"}});
  EXPECT_TRUE(load_config(lookup_only).warnings.empty());
}

TEST(ConfigTest, UnknownInfergateVariablesInTheProcessEnvironment) {
  ::setenv("INFERGATE_UNIT_TEST_BOGUS_VARIABLE", "1", 1);
  auto warnings = load_config(LoadOptions{}).warnings;
  ::unsetenv("INFERGATE_UNIT_TEST_BOGUS_VARIABLE");
  EXPECT_THAT(warnings, ::testing::Contains(
                            HasSubstr("environment INFERGATE_UNIT_TEST_BOGUS_VARIABLE: unknown")));
}

TEST(ConfigTest, ClosestEnvName) {
  EXPECT_EQ(closest_env_name("INFERGATE_HEALTH_INTERVL"), "INFERGATE_HEALTH_INTERVAL");
  EXPECT_EQ(closest_env_name("INFERGATE_health_interval"), "INFERGATE_HEALTH_INTERVAL");
  EXPECT_EQ(closest_env_name("INFERGATE_INTERVAL"), "INFERGATE_HEALTH_INTERVAL");
  EXPECT_EQ(closest_env_name("INFERGATE_CONFG"), "INFERGATE_CONFIG");
  EXPECT_EQ(closest_env_name("INFERGATE_QQQQQQQQQQQQQQQQQQQQ"), "");
}

TEST(ConfigTest, EnvAndFlagErrorsNameTheirOrigin) {
  LoadOptions env_bad;
  env_bad.env = env_of({{"INFERGATE_HEALTH_INTERVAL", "often"}});
  EXPECT_THAT(load_error(env_bad), HasSubstr("environment INFERGATE_HEALTH_INTERVAL: health.interval: invalid duration"));

  LoadOptions flag_bad;
  flag_bad.env = env_of({});
  flag_bad.flags.push_back({"threads", "x", "--threads"});
  EXPECT_THAT(load_error(flag_bad), HasSubstr("--threads: threads: expected an integer"));

  LoadOptions unknown;
  unknown.env = env_of({});
  unknown.flags.push_back({"timeouts.conect", "1s", "--set timeouts.conect"});
  EXPECT_THAT(load_error(unknown), HasSubstr("did you mean 'timeouts.connect'"));

  LoadOptions missing_file;
  missing_file.env = env_of({});
  missing_file.config_file = "/nonexistent/infergate.yaml";
  EXPECT_THAT(load_error(missing_file),
              HasSubstr("cannot read config file '/nonexistent/infergate.yaml': "));
}

TEST(ConfigTest, DumpNamesEachSource) {
  LoadOptions options;
  options.env = env_of({{"INFERGATE_THREADS", "4"}});
  options.flags.push_back({"listen", "127.0.0.1:1", "--listen"});
  auto dump = dump_config(load_config(options).config);
  EXPECT_THAT(dump, HasSubstr("listen: \"127.0.0.1:1\"  # flag"));
  EXPECT_THAT(dump, HasSubstr("threads: 4  # env"));
  EXPECT_THAT(dump, HasSubstr("health:\n"));
  EXPECT_THAT(dump, HasSubstr("  interval: 2s  # default"));
  // The dump is YAML that reads back to the same values.
  auto back = parse_yaml_text(
      [&] {
        std::string without_sources;
        std::istringstream in(dump);
        for (std::string line; std::getline(in, line);) {
          if (line.rfind("#", 0) == 0) continue;
          without_sources += line.substr(0, line.find("  #")) + "\n";
        }
        return without_sources;
      }(),
      "dump.yaml");
  EXPECT_EQ(back.threads, 4);
  EXPECT_EQ(back.listen.to_string(), "127.0.0.1:1");
}

// The log lines print "warning": the same word sets the level, from the file, the environment
// and the flag alike, and means warn.
TEST(ConfigTest, LogLevelWarningIsWarn) {
  EXPECT_EQ(parse_yaml_text("log:\n  level: warning\n", "gw.yaml").log.level, "warn");
  EXPECT_EQ(parse_yaml_text("log.level: warn\n", "gw.yaml").log.level, "warn");
  LoadOptions from_env;
  from_env.env = env_of({{"INFERGATE_LOG_LEVEL", "warning"}});
  EXPECT_EQ(load_config(from_env).config.log.level, "warn");
  LoadOptions from_flag;
  from_flag.env = env_of({});
  from_flag.flags = {{"log.level", "warning", "--log-level"}};
  EXPECT_EQ(load_config(from_flag).config.log.level, "warn");
  EXPECT_THAT(yaml_error("log:\n  level: warnings\n"),
              HasSubstr("log.level: must be one of trace, debug, info, warn (or warning), error, critical, off"));
}

// `infergate config` output given back as --config means the same, whatever the values hold.
TEST(ConfigTest, DumpReadsBackAsTheSameValues) {
  LoadOptions options;
  options.env = env_of({});
  options.flags = {{"listen", "[::1]:0", "--listen"},
                   {"backends", "http://[::1]:9000", "--backend"},
                   {"backends", "http://h:1", "--backend"},
                   {"slurm.host_suffix", "true", "--set"},
                   {"slurm.domain", "null", "--set"},
                   {"slurm.nodelist", "a[1-2],b: c", "--set"},
                   {"health.path", "/h#x?a=[1]", "--set"},
                   {"metrics.listen", "[::1]:9100", "--set"}};
  const auto c = load_config(options).config;
  const auto dump = dump_config(c);
  const auto back = parse_yaml_text(dump, "dump.yaml");
  EXPECT_EQ(back.listen.to_string(), "[::1]:0");
  EXPECT_EQ(back.backends, c.backends);
  EXPECT_EQ(back.slurm.host_suffix, "true");
  EXPECT_EQ(back.slurm.domain, "null");
  EXPECT_EQ(back.slurm.nodelist, "a[1-2],b: c");
  EXPECT_EQ(back.health.path, "/h#x?a=[1]");
  ASSERT_TRUE(back.metrics_listen);
  EXPECT_EQ(back.metrics_listen->to_string(), "[::1]:9100");
  auto values = [](const std::string& text) {  // the dump without its "# source" comments
    std::string out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) out += line.substr(0, line.rfind("  # ")) + "\n";
    return out;
  };
  EXPECT_EQ(values(dump_config(back)), values(dump));
}

// An empty value (`key:`, `~`, `null`) leaves a text key empty and an optional one unset; other
// keys say that nothing was given, on the key's own line. It never becomes the word "null".
TEST(ConfigTest, EmptyYamlValuesAreEmptyNotTheWordNull) {
  auto c = parse_yaml_text("admin:\n  token:\nslurm:\n  host_suffix: ~\n  domain: null\n  infer_tp:\n", "e.yaml");
  EXPECT_EQ(c.admin_token, "");
  EXPECT_EQ(c.slurm.host_suffix, "");
  EXPECT_EQ(c.slurm.domain, "");
  EXPECT_FALSE(c.slurm.infer_tp);
  EXPECT_EQ(parse_yaml_text("slurm:\n  host_suffix: 'null'\n", "e.yaml").slurm.host_suffix, "null");  // quoted: text
  EXPECT_THAT(yaml_error("health:\n  interval: 2s\n  timeout:\n"), HasSubstr("gw.yaml:3: health.timeout: no value given"));
  EXPECT_THAT(yaml_error("threads:\n"), HasSubstr("gw.yaml:1: threads: no value given"));
  EXPECT_THAT(yaml_error("health:\n  path:\n"), HasSubstr("gw.yaml:2: health.path: must start with '/', got ''"));
}

// yaml-cpp reads an unterminated quote as a value running to the end of the file: the keys
// after it would vanish into it.
TEST(ConfigTest, AQuoteLeftOpenIsAnErrorNotTheRestOfTheFile) {
  EXPECT_THAT(yaml_error("slurm:\n  host_suffix: 'ib\nlog:\n  level: debug\n"),
              HasSubstr("gw.yaml:2: the quoted value does not end on this line (a missing '?)"));
  EXPECT_THAT(yaml_error("admin:\n  token: \"secret\nlog:\n  level: debug\n"),
              HasSubstr("gw.yaml:2: the quoted value does not end on this line (a missing \"?)"));
  EXPECT_THAT(yaml_error("backends:\n  - 'http://a:1\n  - http://b:2\n"), HasSubstr("gw.yaml:2: the quoted value"));
  // Quotes that do end, with their escapes, and apostrophes inside plain values are fine.
  auto c = parse_yaml_text("admin:\n  token: 'it''s'\nslurm:\n  nodelist: o'brien[1-2]\nhealth:\n  path: \"/a\\\"b\"\n",
                           "q.yaml");
  EXPECT_EQ(c.admin_token, "it's");
  EXPECT_EQ(c.slurm.nodelist, "o'brien[1-2]");
  EXPECT_EQ(c.health.path, "/a\"b");
}

// The suffix and domain complete Slurm's host names; a bad one is a config error where it was
// given, not only at discovery inside a job (where `infergate config` never looks).
TEST(ConfigTest, SlurmHostSuffixAndDomainAreCheckedWhereTheyAreGiven) {
  EXPECT_THAT(yaml_error("slurm:\n  host_suffix: bad suffix!\n"),
              HasSubstr("gw.yaml:2: slurm.host_suffix: 'bad suffix!': character ' ' at offset 3 is not allowed in "
                        "a host name (only ASCII letters, digits, '-', '_' and '.')"));
  EXPECT_THAT(yaml_error("slurm:\n  domain: ..x\n"),
              HasSubstr("gw.yaml:2: slurm.domain: '..x' is not a valid domain: empty label at offset 0"));
  LoadOptions from_env;
  from_env.env = env_of({{"INFERGATE_SLURM_DOMAIN", "cluster_.-local"}});
  EXPECT_THAT(load_error(from_env),
              HasSubstr("environment INFERGATE_SLURM_DOMAIN: slurm.domain: 'cluster_.-local' is not a valid domain"));
  LoadOptions from_flag;
  from_flag.env = env_of({});
  from_flag.flags = {{"slurm.host_suffix", "-ib:1", "--set"}};
  EXPECT_THAT(load_error(from_flag), HasSubstr("--set: slurm.host_suffix: '-ib:1': character ':' at offset 3"));
  from_flag.flags = {{"slurm.domain", std::string(254, 'a'), "--set"}};
  EXPECT_THAT(load_error(from_flag), HasSubstr("254 characters long, more than 253"));
  // What discovery accepts is accepted: a suffix of name characters, a domain with or without
  // its leading '.', and nothing at all.
  auto c = parse_yaml_text("slurm:\n  host_suffix: -ib_0.rack\n  domain: .cluster.local\n", "gw.yaml");
  EXPECT_EQ(c.slurm.host_suffix, "-ib_0.rack");
  EXPECT_EQ(c.slurm.domain, ".cluster.local");
  EXPECT_EQ(yaml_error("slurm:\n  host_suffix: ''\n  domain:\n"), "no error");
}

TEST(ConfigTest, AOneLetterKeySuggestsNothing) {
  EXPECT_EQ(closest_key("a"), "");
  EXPECT_EQ(closest_key("x"), "");
  EXPECT_EQ(closest_key("retry.max"), "retries.max");
  EXPECT_EQ(closest_key("host_sufix"), "slurm.host_suffix");
}

TEST(ConfigTest, KeysGivenTwiceAndSecondDocumentsAreErrors) {
  EXPECT_THAT(yaml_error("threads: 2\nthreads: 3\n"), HasSubstr("gw.yaml:2: threads: given twice (first on line 1)"));
  EXPECT_THAT(yaml_error("health:\n  interval: 1s\nthreads: 1\nhealth:\n  timeout: 1s\n"),
              HasSubstr("gw.yaml:4: health: given twice (first on line 1)"));
  EXPECT_THAT(yaml_error("health:\n  interval: 1s\n  interval: 2s\n"), HasSubstr("gw.yaml:3: health.interval: given twice"));
  // A key written dotted once and nested once is still given twice, in either order.
  EXPECT_THAT(yaml_error("health.interval: 1s\nhealth:\n  interval: 7s\n"),
              HasSubstr("gw.yaml:3: health.interval: given twice (first on line 1)"));
  EXPECT_THAT(yaml_error("health:\n  interval: 7s\nhealth.interval: 1s\n"),
              HasSubstr("gw.yaml:3: health.interval: given twice (first on line 2)"));
  EXPECT_THAT(yaml_error("threads: 3\n---\nthreads: 4\n"), HasSubstr("gw.yaml:2: a second YAML document"));
  EXPECT_THAT(yaml_error("threads: 3\n...\nthreads: 4\n"), HasSubstr("gw.yaml:3: a second YAML document"));
  // One document with its markers is fine. A lone comma once made yaml-cpp's LoadAll loop
  // forever (found by the fuzzer): it must come back, with an error (yaml-cpp reads an empty
  // document before it and would ignore all the rest).
  EXPECT_EQ(yaml_error("# infergate\n---\nthreads: 3\n...\n# end\n"), "no error");
  EXPECT_THAT(yaml_error(","), HasSubstr("gw.yaml:1: invalid YAML: the document ended before this line"));
}

// Shapes after which yaml-cpp stops reading without a word: the rest of the file would be
// ignored, so they are errors naming the first line it would not read.
TEST(ConfigTest, YamlThatEndsBeforeTheFileDoesIsAnError) {
  EXPECT_THAT(yaml_error(",\nlisten: 127.0.0.1:31000\nthreads: 3\n"),
              HasSubstr("gw.yaml:1: invalid YAML: the document ended before this line, which would be ignored"));
  EXPECT_THAT(yaml_error("{threads: 3}\nlisten: 127.0.0.1:31000\n"), HasSubstr("gw.yaml:2: invalid YAML"));
  EXPECT_THAT(yaml_error("# a comment\n{threads: 3} listen\n"), HasSubstr("gw.yaml:2: invalid YAML"));
  EXPECT_THAT(yaml_error("\"threads\"\nlisten: x\n"), HasSubstr("gw.yaml:2: invalid YAML"));
  // A whole flow map, with a comment after it, is one document.
  EXPECT_EQ(parse_yaml_text("{threads: 3, listen: \"127.0.0.1:31000\"}\n# end\n", "gw.yaml").threads, 3);
}

// Directives belong to the document after them: "%YAML 1.2\n---" is one document, not two.
TEST(ConfigTest, DirectivesBeforeTheFirstDocumentAreAccepted) {
  EXPECT_EQ(yaml_error("%YAML 1.2\n---\nthreads: 2\n"), "no error");
  EXPECT_EQ(yaml_error("# infergate\n%TAG !e! tag:example.com,2000:\n---\nthreads: 2\n...\n"), "no error");
  EXPECT_EQ(parse_yaml_text("%YAML 1.2\n---\nthreads: 3\n", "gw.yaml").threads, 3);
  // After the first document starts, a directive line is no longer before it: a directive
  // after "..." opens a second document.
  EXPECT_THAT(yaml_error("%YAML 1.2\n---\nthreads: 2\n...\n%YAML 1.2\n---\nthreads: 3\n"),
              HasSubstr("gw.yaml:5: a second YAML document"));
  EXPECT_THAT(yaml_error("threads: 2\n---\n%YAML 1.2\n"), HasSubstr("gw.yaml:2: a second YAML document"));
  // A directive does not open the way for a second start or end marker: yaml-cpp would read an
  // empty first document and drop the configuration after it.
  EXPECT_THAT(yaml_error("%YAML 1.2\n...\n---\nthreads: 4\n"), HasSubstr("gw.yaml:3: a second YAML document"));
  EXPECT_THAT(yaml_error("%YAML 1.2\n...\nthreads: 4\n"), HasSubstr("gw.yaml:3: a second YAML document"));
  EXPECT_THAT(yaml_error("%YAML 1.2\n---\n---\nthreads: 3\n"), HasSubstr("gw.yaml:3: a second YAML document"));
  EXPECT_THAT(yaml_error("---\n---\nthreads: 3\n"), HasSubstr("gw.yaml:2: a second YAML document"));
  EXPECT_THAT(yaml_error("...\nthreads: 3\n"), HasSubstr("gw.yaml:2: a second YAML document"));
  // A directive at column 0 after content starts another document.
  EXPECT_THAT(yaml_error("threads: 3\n%YAML 1.2\nlisten: 1.2.3.4:99\n"), HasSubstr("gw.yaml:2: a second YAML document"));
  // A UTF-8 byte-order mark before the directive is not content.
  EXPECT_EQ(parse_yaml_text("\xEF\xBB\xBF%YAML 1.2\n---\nthreads: 3\n", "gw.yaml").threads, 3);
}

// Static backends follow the host-name rules of Slurm hosts and of the admin API's added
// backends: a config error at start-up, not a backend that never resolves.
TEST(ConfigTest, StaticBackendHostsMustBeValidHostNames) {
  EXPECT_THAT(yaml_error("backends:\n  - http://a..b:80\n"),
              HasSubstr("gw.yaml:2: backends: invalid backend URL 'http://a..b:80': not a valid host name: "
                        "empty label at offset 2"));
  EXPECT_THAT(yaml_error("backends: [\"http://" + std::string(300, 'a') + ":80\"]\n"),
              HasSubstr("300 characters long, more than 253"));
  EXPECT_THAT(yaml_error("backends: [\"http://" + std::string(64, 'a') + ".b:80\"]\n"),
              HasSubstr("64 characters long, more than 63"));
  EXPECT_THAT(yaml_error("backends: [\"http://127.0.0.01:80\"]\n"), HasSubstr("must be a dotted quad"));
  EXPECT_THAT(yaml_error("backends: [\"1.2.3:80\"]\n"), HasSubstr("must be a dotted quad"));
  EXPECT_THAT(yaml_error("backends: [\"http://:80\"]\n"), HasSubstr("expected http://host:port"));
  EXPECT_EQ(yaml_error("backends: [\"http://gpu-a001.cluster:9000/\", \"127.0.0.1:80\", \"http://[::1]:80\"]\n"),
            "no error");
}

// Digits and dots are an IPv4 address or nothing: "1.2.3" used to pass and fail only at bind,
// and "127.1" was looked up as a name. Brackets hold IPv6 only.
TEST(ConfigTest, ListenAddressesOfDigitsAndDotsMustBeDottedQuads) {
  for (const std::string key : {"listen", "metrics.listen"}) {
    SCOPED_TRACE(key);
    for (const std::string host : {"1.2.3", "127.1", "1.2.3.4.5", "256.1.1.1", "127.0.0.01", "1..2.3"}) {
      EXPECT_THAT(yaml_error(key + ": " + host + ":80\n"),
                  HasSubstr(key + ": '" + host + "' is not an IPv4 address: a host of digits and dots must be a "
                                  "dotted quad (four numbers 0-255 without leading zeros)"));
    }
    EXPECT_THAT(yaml_error(key + ": \"[127.0.0.1]:80\"\n"),
                HasSubstr(key + ": '[127.0.0.1]:80': brackets hold an IPv6 address; write an IPv4 address "
                                "without them (127.0.0.1:80)"));
    EXPECT_THAT(yaml_error(key + ": \"[gpu-a001]:80\"\n"), HasSubstr("brackets hold an IPv6 address"));
  }
  LoadOptions flag;
  flag.env = env_of({});
  flag.flags = {{"listen", "1.2.3:80", "--listen"}};
  EXPECT_THAT(load_error(flag), HasSubstr("--listen: listen: '1.2.3' is not an IPv4 address"));
  EXPECT_EQ(yaml_error("listen: 127.0.0.1:80\nmetrics:\n  listen: 10.1.2.3:9100\n"), "no error");
  EXPECT_EQ(yaml_error("listen: gpu-a001.cluster:80\n"), "no error");
  EXPECT_FALSE(parse_endpoint("1.2.3:80"));
  EXPECT_FALSE(parse_endpoint("127.1:0"));
  EXPECT_TRUE(parse_endpoint("127.0.0.1:0"));
}

TEST(ConfigTest, ValuesThatWouldBreakARequestLineOrAnAddressAreRefused) {
  EXPECT_THAT(yaml_error("health:\n  path: \"/health HTTP/1.0\\r\\nX-Evil: 1\"\n"),
              HasSubstr("health.path: must be a path without spaces"));
  EXPECT_THAT(yaml_error("health:\n  path: /a b\n"), HasSubstr("health.path: must be a path without spaces"));
  EXPECT_FALSE(parse_endpoint("[]:80"));
  EXPECT_FALSE(parse_endpoint("[a:b]:80"));
  EXPECT_FALSE(parse_endpoint("[host]:80"));
  EXPECT_FALSE(parse_endpoint("256.1.1.1:80"));
  EXPECT_TRUE(parse_endpoint("[::1]:0"));
  EXPECT_TRUE(parse_endpoint("node-1.cluster:80"));
  EXPECT_EQ(parse_endpoint(":8080")->host, "0.0.0.0");
  EXPECT_THAT(yaml_error("backends:\n  - http://[]:80\n"), HasSubstr("invalid backend URL"));
  EXPECT_THAT(yaml_error("listen: 127.0.0.1:8080\nmetrics:\n  listen: 127.0.0.1:8080\n"),
              HasSubstr("metrics.listen (127.0.0.1:8080, from line 3 of the config file) must not be the gateway's own address"));
  EXPECT_THAT(yaml_error("listen: 0.0.0.0:8080\nmetrics:\n  listen: 127.0.0.1:8080\n"), HasSubstr("must not be"));
  EXPECT_EQ(yaml_error("listen: 127.0.0.1:0\nmetrics:\n  listen: 127.0.0.1:0\n"), "no error");  // both any port
}

TEST(ConfigTest, AdminTokenIsNotPrinted) {
  LoadOptions options;
  options.env = env_of({{"INFERGATE_ADMIN_TOKEN", "s3cret"}});
  auto c = load_config(options).config;
  EXPECT_EQ(c.admin_token, "s3cret");
  EXPECT_THAT(dump_config(c), ::testing::Not(HasSubstr("s3cret")));
  // What it prints instead reads back as an error, not as a token anyone could guess.
  EXPECT_THAT(yaml_error("admin:\n  token: \"***\"\n"), HasSubstr("admin.token: '***' is what `infergate config` prints"));
}

// A token no Authorization header can carry is refused at start-up, not a locked admin API.
TEST(ConfigTest, AdminTokenThatNoClientCanSendIsAnError) {
  EXPECT_THAT(yaml_error("admin:\n  token: |\n    s3cret\n"), HasSubstr("gw.yaml:2: admin.token: the token holds a control character"));
  LoadOptions options;
  options.env = env_of({{"INFERGATE_ADMIN_TOKEN", "s3cret "}});
  try {
    load_config(options);
    ADD_FAILURE() << "a token ending with a space was taken";
  } catch (const ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr("INFERGATE_ADMIN_TOKEN"));
    EXPECT_THAT(e.what(), HasSubstr("starts or ends with a space"));
  }
  EXPECT_EQ(yaml_error("admin:\n  token: \"with inner space\"\n"), "no error");
}

TEST(ConfigTest, EveryKeyHasEnvNameDefaultAndHelp) {
  for (const auto& k : known_keys()) {
    EXPECT_EQ(k.env.rfind("INFERGATE_", 0), 0u) << k.key;
    EXPECT_FALSE(k.help.empty()) << k.key;
    EXPECT_FALSE(k.default_value.empty()) << k.key;
  }
  EXPECT_EQ(closest_key("threds"), "threads");
}
