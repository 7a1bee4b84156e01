// The infergate command line as a user runs it: discover, config, --help, --version, errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "harness.hpp"

using namespace infergate::test;
using ::testing::HasSubstr;
using ::testing::Not;

namespace {

struct Run {
  int code = -1;
  std::string out;
  std::string err;
};

Run run(std::vector<std::string> args, std::vector<std::string> env = {}) {
  Process p(gateway_binary(), std::move(args), std::move(env));
  Run r;
  r.code = p.wait_exit(10s);
  r.out = p.output();
  r.err = p.errors();
  return r;
}

}  // namespace

TEST(CliTest, DiscoverPrintsTheIssueExample) {
  auto r = run({"discover"}, {"SLURM_JOB_NODELIST=gpu-a[001-003],gpu-b[7,9]", "NUM_TRAINING_NODES=1", "INFER_TP=2"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<std::string> lines;
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 16u) << r.out;
  EXPECT_EQ(lines.front(), "http://gpu-a002:9000");
  EXPECT_EQ(lines.back(), "http://gpu-b9:9003");
}

TEST(CliTest, DiscoverJson) {
  auto r = run({"discover", "--json", "--backend", "http://10.1.2.3:8000"},
               {"SLURM_JOB_NODELIST=train,inf[1-2]", "INFER_TP=8"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.size(), 3u);
  EXPECT_EQ(j[0]["url"], "http://inf1:9000");
  EXPECT_EQ(j[0]["node"], "inf1");
  EXPECT_EQ(j[0]["slot"], 0);
  EXPECT_EQ(j[0]["source"], "slurm");
  EXPECT_EQ(j[2]["url"], "http://10.1.2.3:8000");
  EXPECT_EQ(j[2]["source"], "static");
}

TEST(CliTest, DiscoverTakesGpusPerNodeFromSlurmAndSaysWhereFrom) {
  auto r = run({"discover"}, {"SLURM_JOB_NODELIST=n[1-3]", "NUM_TRAINING_NODES=1", "INFER_TP=2",
                              "SLURM_GPUS_PER_NODE=gpu:a100:4"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "http://n2:9000\nhttp://n2:9001\nhttp://n3:9000\nhttp://n3:9001\n");
  EXPECT_THAT(r.err, HasSubstr("4 GPUs per node from SLURM_GPUS_PER_NODE"));

  auto defaulted = run({"discover"}, {"SLURM_JOB_NODELIST=n[1-2]", "NUM_TRAINING_NODES=1", "INFER_TP=8"});
  ASSERT_EQ(defaulted.code, 0) << defaulted.err;
  // A guess that may be wrong for the job is a warning.
  EXPECT_THAT(defaulted.err, HasSubstr("infergate: warning: the default: none of slurm.gpus_per_node"));
  EXPECT_THAT(defaulted.err, HasSubstr("assuming 8 GPUs per inference node"));
}

TEST(CliTest, DiscoverWithoutSlurmSaysWhyNothingWasFound) {
  if (std::getenv("SLURM_JOB_NODELIST") != nullptr || std::getenv("SLURM_NODELIST") != nullptr) {
    GTEST_SKIP() << "the tests run inside a Slurm job";
  }
  auto r = run({"discover"});
  EXPECT_EQ(r.code, 1) << r.err;  // nothing found: neither success nor a bad environment (2)
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, HasSubstr("no backends found"));
  EXPECT_THAT(r.err, HasSubstr("SLURM_JOB_NODELIST"));
  auto json = run({"discover", "--json"});
  EXPECT_EQ(json.code, 1) << json.err;
  EXPECT_EQ(json.out, "[]\n");
}

TEST(CliTest, UnknownInfergateVariablesAreWarnedAbout) {
  auto r = run({"config"}, {"INFERGATE_HEALTH_INTERVL=7s"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("INFERGATE_HEALTH_INTERVL"));
  EXPECT_THAT(r.err, HasSubstr("INFERGATE_HEALTH_INTERVAL"));
}

TEST(CliTest, BadInputExitsTwoWithOneLine) {
  struct Case {
    std::vector<std::string> args;
    std::vector<std::string> env;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"discover"}, {"SLURM_JOB_NODELIST=gpu[1-"}, "unbalanced '['"},
      {{"discover"}, {"SLURM_JOB_NODELIST=gpu[5-1]"}, "reversed range"},
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "INFER_TP=0"}, "INFER_TP='0' is not a positive integer"},
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "INFER_TP=-2"}, "INFER_TP='-2' is not a positive integer"},
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "INFER_TP=abc"}, "INFER_TP='abc' is not a positive integer"},
      // Digits enough to overflow an int before the letter (a sanitizer build reported it).
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "INFER_TP=99999999999x"}, "INFER_TP='99999999999x' is not a positive integer"},
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "INFER_TP=3"}, "INFER_TP=3 does not divide the 8 GPUs per node"},
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "NUM_TRAINING_NODES=x"}, "NUM_TRAINING_NODES='x'"},
      {{"discover"}, {"SLURM_JOB_NODELIST=a,b", "NUM_TRAINING_NODES=2"}, "no host left for inference"},
      {{"discover", "--backend", "ftp://x:1"}, {}, "invalid backend URL"},
      {{"discover", "--backend", "http://a..b:80"}, {}, "--backend: backends: invalid backend URL 'http://a..b:80': not a valid host name: empty label"},
      {{"--bogus"}, {}, "unknown flag '--bogus'"},
      {{"--threads", "lots"}, {}, "--threads: threads: expected an integer"},
      {{"--set", "health.intervall=1s"}, {}, "did you mean 'health.interval'"},
      {{"--config", "/nonexistent.yaml"}, {}, "cannot read config file"},
      {{"--config", "/dev/zero"}, {}, "cannot read config file '/dev/zero': larger than 16MiB"},
  };
  for (const auto& c : cases) {
    auto r = run(c.args, c.env);
    EXPECT_EQ(r.code, 2) << c.message;
    EXPECT_THAT(r.err, HasSubstr(c.message));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.out, "");
  }
}

// deploy/demo.sh checks its port variables before it builds: a typo is told at once, not after
// a build of minutes. The build directory it was given stays empty.
TEST(DemoTest, BadPortVariablesAreRefusedBeforeTheBuild) {
  const auto build_dir = std::filesystem::temp_directory_path() /
                         ("infergate-demo-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(build_dir);
  const std::vector<std::pair<std::string, std::string>> cases = {{"INFERGATE_DEMO_PORT", "80a"},
                                                                  {"INFERGATE_DEMO_BACKEND_PORT", "65535"}};
  for (const auto& [var, value] : cases) {
    Process demo("/bin/bash", {INFERGATE_SOURCE_DIR "/deploy/demo.sh"},
                 {var + "=" + value, "BUILD_DIR=" + build_dir.string()});
    EXPECT_EQ(demo.wait_exit(10s), 2) << demo.errors();
    EXPECT_THAT(demo.errors(), HasSubstr("demo: " + var + "='" + value + "' is not a port (1-65534)"));
    EXPECT_TRUE(std::filesystem::is_empty(build_dir)) << var;
  }
  std::filesystem::remove_all(build_dir);
}

// deploy/demo.sh run inside salloc or srun: the enclosing job's variables and the operator's
// INFERGATE_* layout settings do not change the demo's allocation (SLURM_JOB_GPUS=0 came before
// the demo's GPU count and left INFER_TP=4 no room). `infergate discover` under the demo's
// environment finds its 4 mock servers and nothing else.
TEST(DemoTest, TheSimulatedAllocationIgnoresAnEnclosingJob) {
  Process discover("/bin/bash",
                   {"-c", "source \"$1\" && demo_allocation 9100 && exec \"$2\" discover", "demo",
                    INFERGATE_SOURCE_DIR "/deploy/demo-allocation.sh", gateway_binary()},
                   {"SLURM_JOB_GPUS=0", "SLURM_GPUS_PER_NODE=1", "SLURM_GPUS_ON_NODE=1", "SLURM_JOB_NODELIST=gpu[1-4]",
                    "SLURM_NODELIST=gpu[1-4]", "SLURM_HET_SIZE=2", "SLURM_JOB_NODELIST_HET_GROUP_1=gpu[3-4]",
                    "SLURM_GPUS_PER_NODE_HET_GROUP_1=1", "NUM_TRAINING_NODES=2", "INFER_TP=1",
                    "INFERGATE_SLURM_HET_GROUP=1", "INFERGATE_SLURM_TRAINING_NODES=2",
                    "INFERGATE_SLURM_HOST_SUFFIX=-ib", "INFERGATE_BACKENDS=http://10.0.0.1:80",
                    "INFERGATE_CONFIG=/nonexistent/infergate.yaml"});
  ASSERT_EQ(discover.wait_exit(10s), 0) << discover.errors();
  EXPECT_EQ(discover.output(),
            "http://127.0.10.2:9100\nhttp://127.0.10.2:9101\nhttp://127.0.10.3:9100\nhttp://127.0.10.3:9101\n");
  // One line, no warning (a heterogeneous job, another GPU count) about the enclosing job.
  const auto err = discover.errors();
  EXPECT_THAT(err, HasSubstr("Slurm nodelist '127.0.10.[1-3]' from SLURM_JOB_NODELIST: 2 inference node(s) x 2 "
                             "server(s) (INFER_TP=4, 8 GPUs per node from SLURM_GPUS_PER_NODE='8')"));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
}

TEST(CliTest, VersionHelpAndConfig) {
  auto version = run({"--version"});
  EXPECT_EQ(version.code, 0);
  EXPECT_THAT(version.out, ::testing::MatchesRegex("infergate [0-9]+\\.[0-9]+\\.[0-9]+\n"));
  auto help = run({"--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_THAT(help.out, HasSubstr("--no-slurm"));
  auto short_help = run({"-h"});
  EXPECT_EQ(short_help.code, 0) << short_help.err;
  EXPECT_EQ(short_help.out, help.out);
  auto config = run({"config", "--threads", "3"}, {"INFERGATE_HEALTH_INTERVAL=5s"});
  EXPECT_EQ(config.code, 0) << config.err;
  EXPECT_THAT(config.out, HasSubstr("threads: 3  # flag"));
  EXPECT_THAT(config.out, HasSubstr("  interval: 5s  # env"));
  EXPECT_THAT(config.out, HasSubstr("listen: \"0.0.0.0:8080\"  # default"));
}

// The slurm.* keys stay null when the job's variables give the values: `config` says what the
// job resolves them to, and from where, as comments (the output still loads as --config).
TEST(CliTest, ConfigShowsTheSlurmValuesTheEnvironmentGives) {
  auto r = run({"config"}, {"SLURM_JOB_NODELIST=n[1-4]", "NUM_TRAINING_NODES=2", "INFER_TP=2", "SLURM_GPUS_PER_NODE=4"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("  training_nodes: null  # default\n"));
  EXPECT_THAT(r.out, HasSubstr("#   nodelist: n[1-4]  (SLURM_JOB_NODELIST)\n"));
  EXPECT_THAT(r.out, HasSubstr("#   training_nodes: 2  (NUM_TRAINING_NODES=2)\n"));
  EXPECT_THAT(r.out, HasSubstr("#   infer_tp: 2  (INFER_TP=2)\n"));
  EXPECT_THAT(r.out, HasSubstr("#   gpus_per_node: 4  (SLURM_GPUS_PER_NODE='4')\n"));
  EXPECT_THAT(r.out, HasSubstr("#   backends: 4  (2 inference node(s) x 2 (gpus_per_node / infer_tp))\n"));

  // A nodelist read with its line break (from a file, a YAML block) is shown on one line, and
  // the output still loads.
  auto newline = run({"config"}, {"SLURM_JOB_NODELIST=n[1-4]\n", "INFER_TP=2", "SLURM_GPUS_PER_NODE=4"});
  ASSERT_EQ(newline.code, 0) << newline.err;
  EXPECT_THAT(newline.out, HasSubstr("#   nodelist: n[1-4]  (SLURM_JOB_NODELIST)\n"));
  const auto path = std::string("/tmp/infergate-cli-nl-") + std::to_string(getpid()) + ".yaml";
  std::ofstream(path) << newline.out;
  auto reloaded = run({"config", "--config", path});
  std::filesystem::remove(path);
  EXPECT_EQ(reloaded.code, 0) << reloaded.err;

  auto none = run({"config"});
  ASSERT_EQ(none.code, 0) << none.err;
  EXPECT_THAT(none.out, HasSubstr("# Slurm job: no Slurm nodelist (SLURM_JOB_NODELIST unset)\n"));

  // A job environment the gateway would refuse: said on stdout and stderr, and `config` still
  // prints (it is how one looks at the settings to find the mistake).
  auto bad = run({"config"}, {"SLURM_JOB_NODELIST=a,b", "INFER_TP=3"});
  EXPECT_EQ(bad.code, 0) << bad.err;
  EXPECT_THAT(bad.out, HasSubstr("# Slurm job: cannot be read: INFER_TP=3 does not divide the 8 GPUs per node"));
  EXPECT_THAT(bad.err, HasSubstr("warning: INFER_TP=3 does not divide"));
}

TEST(CliTest, ConfigFileErrorsNameFileAndLine) {
  auto path = std::string("/tmp/infergate-cli-") + std::to_string(getpid()) + ".yaml";
  {
    std::ofstream out(path);
    out << "listen: 127.0.0.1:0\nhealth:\n  interval: sometimes\n";
  }
  auto r = run({"config", "--config", path});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr(path + ":3: health.interval: invalid duration 'sometimes'"));
  std::remove(path.c_str());
}

TEST(CliTest, ServesWithBackendsFromSlurmVariables) {
  auto mock = start_mock();
  // A simulated allocation: a training node (127.0.0.2) and an inference node with one server.
  auto gw = start_gateway({"--set", "slurm.enabled=true", "--set", "slurm.base_port=" + std::to_string(mock.port)},
                          {"SLURM_JOB_NODELIST=127.0.0.2,127.0.0.1", "NUM_TRAINING_NODES=1", "INFER_TP=8"});
  ASSERT_TRUE(poll_until([&] { return http_request(gw.port, "GET", "/ready").status == 200; }, 10s))
      << gw.process->errors();
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.header("X-Backend"), "127.0.0.1:" + std::to_string(mock.port));
}

// Targets and request ids reach the log: with --log-format json every line must stay one JSON
// object whose keys the gateway chose, whatever a client puts in them.
TEST(CliTest, JsonLogLinesStayJsonWhateverTheClientSends) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--log-format", "json", "--set", "log.access=true"});
  ASSERT_TRUE(poll_until([&] { return http_request(gw.port, "GET", "/ready").status == 200; }, 10s));
  auto forged = raw_exchange(gw.port,
                             "GET /v1/x\",\"level\":\"critical\",\"forged\":\"yes HTTP/1.1\r\nHost: x\r\n"
                             "X-Request-ID: id\"with\\quotes\r\nConnection: close\r\n\r\n");
  ASSERT_THAT(forged, HasSubstr("HTTP/1.1 "));
  ASSERT_TRUE(poll_until([&] { return gw.process->errors().find("forged") != std::string::npos; }, 5s))
      << gw.process->errors();
  std::istringstream lines(gw.process->errors());
  std::string line;
  int parsed = 0;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(j.is_object()) << line;
    EXPECT_FALSE(j.contains("forged")) << line;
    EXPECT_NE(j["level"], "critical") << line;
    ++parsed;
  }
  EXPECT_GT(parsed, 2);
}

// Settings that cannot work as asked are warned about at start: more client connections than
// the open-file limit allows, more healthy backends needed than there are.
TEST(CliTest, SettingsThatCannotWorkAreWarnedAboutAtStart) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "health.min_healthy_backends=3", "--set",
                           "limits.max_client_connections=10000000"});
  EXPECT_THAT(gw.process->errors(), HasSubstr("limits.max_client_connections (10000000) is more than the open-file limit"));
  EXPECT_THAT(gw.process->errors(), HasSubstr("health.min_healthy_backends is 3 but only 1 backend(s) were found"));
  auto fine = start_gateway({"--backend", mock.url()});
  EXPECT_THAT(fine.process->errors(), Not(HasSubstr("is more than the open-file limit")));
  EXPECT_THAT(fine.process->errors(), Not(HasSubstr("health.min_healthy_backends is")));
}

// With --log-format json, the line saying why the gateway did not start is JSON too (a log
// pipeline reads it), and so is a warning carrying bytes that are not UTF-8.
TEST(CliTest, AStartUpErrorIsAJsonLineWithTheJsonLogFormat) {
  auto r = run({"--log-format", "json", "--listen", "127.0.0.1:0"},
               {"SLURM_JOB_NODELIST=n[1-2]", "INFER_TP=3", "INFERGATE_X\xff=1"});
  EXPECT_EQ(r.code, 2) << r.err;
  std::istringstream lines(r.err);
  std::string line;
  std::vector<nlohmann::json> parsed;
  while (std::getline(lines, line)) {
    parsed.push_back(nlohmann::json::parse(line, nullptr, false));
    ASSERT_TRUE(parsed.back().is_object()) << line;
  }
  ASSERT_FALSE(parsed.empty());
  EXPECT_EQ(parsed.back()["level"], "critical");
  EXPECT_THAT(parsed.back()["msg"].get<std::string>(), HasSubstr("INFER_TP=3 does not divide the 8 GPUs per node"));
  EXPECT_THAT(r.err, HasSubstr("INFERGATE_X\\ufffd")) << r.err;
  // With the log turned off, the reason still reaches stderr.
  auto quiet = run({"--log-format", "json", "--log-level", "off", "--listen", "127.0.0.1:0"},
                   {"SLURM_JOB_NODELIST=n[1-2]", "INFER_TP=3"});
  EXPECT_EQ(quiet.code, 2);
  EXPECT_THAT(quiet.err, HasSubstr("INFER_TP=3 does not divide the 8 GPUs per node"));
}

// The harness itself: a line printed just before the process exits is still seen (the reader
// thread may drain the pipe after the exit is noticed; a CI run once failed on that race).
TEST(HarnessTest, SeesALinePrintedJustBeforeTheProcessExits) {
  for (int i = 0; i < 200; ++i) {
    Process p("/bin/sh", {"-c", "printf 'first\\nlast line %s\\n' " + std::to_string(i)});
    EXPECT_EQ(p.wait_for_line(std::regex(R"(last line (\d+))"), 10s), std::to_string(i));
  }
}

// The start-up log gives limits.max_body_memory as the config writes sizes: a limit under 1 MiB
// is not "0 MiB".
TEST(CliTest, TheBodyMemoryLimitIsLoggedAsGiven) {
  Process gw(gateway_binary(), {"--no-slurm", "--listen", "127.0.0.1:0", "--set", "limits.max_body=100KiB", "--set",
                                "limits.max_body_memory=100KiB"});
  gw.wait_for_line(std::regex(R"(infergate listening on http://127\.0\.0\.1:\d+\n)"));
  ASSERT_TRUE(poll_until([&] { return gw.errors().find("of request bodies at once") != std::string::npos; }, 5s))
      << gw.errors();
  EXPECT_THAT(gw.errors(), HasSubstr("holding up to 100KiB of request bodies at once (limits.max_body_memory; memory "));
}

// The listening line is a URL scripts can use as it is: an IPv6 host in brackets.
TEST(CliTest, AnIpv6ListenAddressIsPrintedAsAUsableUrl) {
  Process gw(gateway_binary(), {"--no-slurm", "--listen", "[::1]:0", "--log-level", "warn"});
  const int port = std::stoi(gw.wait_for_line(std::regex(R"(infergate listening on http://\[::1\]:(\d+)\n)")));
  const int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in6 addr{};
  addr.sin6_family = AF_INET6;
  addr.sin6_port = htons(static_cast<std::uint16_t>(port));
  addr.sin6_addr = in6addr_loopback;
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  const std::string request = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  ASSERT_EQ(::send(fd, request.data(), request.size(), MSG_NOSIGNAL), static_cast<ssize_t>(request.size()));
  std::string answer;
  char buf[512];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) answer.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  EXPECT_EQ(answer.rfind("HTTP/1.1 200 ", 0), 0u) << answer;
}

// Workers share their port through SO_REUSEPORT, which any process of the same user could join:
// a second gateway on a port already served (two jobs on one node, both on 8080) would get half
// of the first one's clients. It refuses to start instead, and the first serves on alone.
TEST(CliTest, ASecondGatewayOnTheSamePortRefusesToStart) {
  for (const std::string host : {"127.0.0.1", "[::1]"}) {
    Process first(gateway_binary(), {"--no-slurm", "--listen", host + ":0", "--threads", "2", "--log-level", "warn"});
    const int port = std::stoi(first.wait_for_line(std::regex(R"(infergate listening on http://\S+:(\d+)\n)")));
    const std::string listen = host + ":" + std::to_string(port);
    auto second = run({"--no-slurm", "--listen", listen, "--threads", "2"});
    EXPECT_EQ(second.code, 1) << second.err;
    EXPECT_THAT(second.err, HasSubstr("cannot listen on " + listen + ": another process already listens on " + listen));
    EXPECT_EQ(second.out.find("infergate listening"), std::string::npos) << second.out;
    if (host == "127.0.0.1") {
      for (int i = 0; i < 8; ++i) EXPECT_EQ(http_request(port, "GET", "/health").status, 200);
    }
    EXPECT_TRUE(first.running());
  }
}

// A listen host name that resolves to a loopback address (Debian maps a node's own name to
// 127.0.1.1) cannot be reached from the other nodes: the log says so, and which address it is.
TEST(CliTest, AListenNameOnLoopbackIsWarnedAbout) {
  const char* asan_env = std::getenv("ASAN_OPTIONS");
  const std::string asan = asan_env != nullptr ? asan_env : "";
  // The test resolver answers 127.0.0.1 for this name.
  Process gw(gateway_binary(), {"--no-slurm", "--listen", "trainer-node.test:0"},
             {"LD_PRELOAD=" INFERGATE_HANGING_RESOLVER, "IG_TEST_HANG_HOST=trainer-node.test", "IG_TEST_HANG_AFTER=100",
              "ASAN_OPTIONS=" + asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"});
  gw.wait_for_line(std::regex(R"(infergate listening on http://trainer-node\.test:\d+\n)"));
  ASSERT_TRUE(poll_until([&] { return gw.errors().find("serving on") != std::string::npos; }, 5s));
  EXPECT_THAT(gw.errors(), HasSubstr("(127.0.0.1) with"));
  EXPECT_THAT(gw.errors(), HasSubstr("listen: 'trainer-node.test' resolves to the loopback address 127.0.0.1"));

  Process plain(gateway_binary(), {"--no-slurm", "--listen", "127.0.0.1:0"});
  plain.wait_for_line(std::regex(R"(infergate listening on http://127\.0\.0\.1:\d+\n)"));
  ASSERT_TRUE(poll_until([&] { return plain.errors().find("serving on") != std::string::npos; }, 5s));
  EXPECT_THAT(plain.errors(), Not(HasSubstr("loopback")));
}

// A stop during a listen address's name lookup (here metrics.listen's, whose name server never
// answers) ends the gateway at once: it is not listening yet, so there is nothing to drain. The
// signal was held until the lookup gave up (30 s), and the gateway then exited 1 for the lookup.
TEST(CliTest, AStopDuringAListenAddressLookupEndsTheGatewayAtOnce) {
  const char* asan_env = std::getenv("ASAN_OPTIONS");
  const std::string asan = asan_env != nullptr ? asan_env : "";
  Process gw(gateway_binary(), {"--no-slurm", "--listen", "127.0.0.1:0", "--set", "metrics.listen=dns-hangs.test:0"},
             {"LD_PRELOAD=" INFERGATE_HANGING_RESOLVER, "IG_TEST_HANG_HOST=dns-hangs.test",
              "ASAN_OPTIONS=" + asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"});
  // Logged just before the server starts: the lookup comes right after.
  ASSERT_TRUE(poll_until([&] { return gw.errors().find("requests get 503 until some are added") != std::string::npos; }, 10s))
      << gw.errors();
  const auto stopped = Clock::now();
  ASSERT_EQ(::kill(gw.pid(), SIGTERM), 0);
  EXPECT_EQ(gw.wait_exit(10s), 128 + SIGTERM) << gw.errors();
  EXPECT_LT(Clock::now() - stopped, 5s);
  EXPECT_THAT(gw.output(), Not(HasSubstr("listening")));
}

// A more specific address on a port another gateway serves on the wildcard address would take
// all its clients for that address (the kernel prefers the exact match): refused too. A different
// specific address on the same port overlaps nothing and starts.
TEST(CliTest, AnOverlappingAddressOnAServedPortRefusesToStart) {
  Process wildcard(gateway_binary(), {"--no-slurm", "--listen", "0.0.0.0:0", "--log-level", "warn"});
  const int port = std::stoi(wildcard.wait_for_line(std::regex(R"(infergate listening on http://\S+:(\d+)\n)")));
  auto specific = run({"--no-slurm", "--listen", "127.0.0.1:" + std::to_string(port)});
  EXPECT_EQ(specific.code, 1) << specific.err;
  EXPECT_THAT(specific.err, HasSubstr("another process already listens on 0.0.0.0:" + std::to_string(port)));

  Process one(gateway_binary(), {"--no-slurm", "--listen", "127.0.0.1:0", "--log-level", "warn"});
  const int shared = std::stoi(one.wait_for_line(std::regex(R"(infergate listening on http://\S+:(\d+)\n)")));
  Process other(gateway_binary(), {"--no-slurm", "--listen", "127.0.0.2:" + std::to_string(shared), "--log-level", "warn"});
  other.wait_for_line(std::regex(R"(infergate listening on http://127\.0\.0\.2:\d+\n)"));
  EXPECT_TRUE(one.running());
}
