#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "slurm/hostlist.hpp"

using namespace infergate::slurm;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

namespace {

struct Good {
  const char* list;
  std::vector<std::string> hosts;
};

struct Bad {
  const char* list;
  std::size_t position;
  const char* problem;
};

class HostlistGood : public ::testing::TestWithParam<Good> {};
class HostlistBad : public ::testing::TestWithParam<Bad> {};

// A `scontrol` shell script first on PATH while the object lives (no Slurm on test machines).
class FakeScontrol {
 public:
  explicit FakeScontrol(const std::string& script) {
    std::string dir =
        (std::filesystem::temp_directory_path() / "infergate-scontrol-XXXXXX").string();
    if (::mkdtemp(dir.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = dir;
    const auto program = dir_ / "scontrol";
    std::ofstream(program) << "#!/bin/sh\n" << script << "\n";
    ::chmod(program.c_str(), 0755);
    const char* path = std::getenv("PATH");
    old_path_ = path ? path : "/usr/bin:/bin";
    ::setenv("PATH", (dir_.string() + ":" + old_path_).c_str(), 1);
  }
  ~FakeScontrol() {
    ::setenv("PATH", old_path_.c_str(), 1);
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  FakeScontrol(const FakeScontrol&) = delete;
  FakeScontrol& operator=(const FakeScontrol&) = delete;

 private:
  std::filesystem::path dir_;
  std::string old_path_;
};

std::string scontrol_error(std::chrono::milliseconds timeout,
                           std::size_t max_hosts = kDefaultMaxHosts) {
  try {
    scontrol_hostnames("n[1-", timeout, max_hosts);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_P(HostlistGood, ExpandsLikeScontrol) {
  EXPECT_EQ(expand_hostlist(GetParam().list), GetParam().hosts) << GetParam().list;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, HostlistGood,
    ::testing::Values(
        Good{"node1", {"node1"}},
        Good{"a,b,c", {"a", "b", "c"}},
        Good{"gpu[1-3]", {"gpu1", "gpu2", "gpu3"}},
        Good{"gpu[001-004,010]", {"gpu001", "gpu002", "gpu003", "gpu004", "gpu010"}},
        Good{"n[7]", {"n7"}},
        Good{"n[07]", {"n07"}},
        Good{"n[1,3,5]", {"n1", "n3", "n5"}},
        Good{"n[5,1]", {"n5", "n1"}},  // order as written, like scontrol
        Good{"r[1-2]n[01-02]", {"r1n01", "r1n02", "r2n01", "r2n02"}},
        Good{"node[1-3]-ib", {"node1-ib", "node2-ib", "node3-ib"}},
        Good{"a[1-2]b[3]c", {"a1b3c", "a2b3c"}},
        Good{"gpu-a[001-003],gpu-b[7,9]", {"gpu-a001", "gpu-a002", "gpu-a003", "gpu-b7", "gpu-b9"}},
        Good{"x[8-11]", {"x8", "x9", "x10", "x11"}},
        Good{"x[08-11]", {"x08", "x09", "x10", "x11"}},
        Good{"x[98-101]", {"x98", "x99", "x100", "x101"}},
        Good{"[1-2]", {"1", "2"}},
        Good{"127.0.10.[1-3]", {"127.0.10.1", "127.0.10.2", "127.0.10.3"}},
        Good{"a,a", {"a", "a"}},  // scontrol does not de-duplicate either
        Good{"  gpu[1-2]\n", {"gpu1", "gpu2"}},
        Good{"n[0-0]", {"n0"}},
        Good{"c1,g[1-2],c2", {"c1", "g1", "g2", "c2"}},
        Good{"node.example.com", {"node.example.com"}},
        Good{"r[1-2]n[1-2]s[1-2]", {"r1n1s1", "r1n1s2", "r1n2s1", "r1n2s2", "r2n1s1", "r2n1s2", "r2n2s1", "r2n2s2"}}));

TEST_P(HostlistBad, NamesThePositionAndTheProblem) {
  try {
    expand_hostlist(GetParam().list, 1000);
    FAIL() << "expected an error for '" << GetParam().list << "'";
  } catch (const HostlistError& e) {
    EXPECT_EQ(e.position(), GetParam().position) << e.what();
    EXPECT_THAT(e.what(), HasSubstr(GetParam().problem));
    EXPECT_THAT(e.what(), HasSubstr("position " + std::to_string(GetParam().position)));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, HostlistBad,
    ::testing::Values(
        Bad{"", 0, "empty hostlist"}, Bad{"   ", 0, "empty hostlist"},
        Bad{"gpu[1-3", 3, "unbalanced '['"}, Bad{"gpu1-3]", 6, "unbalanced ']'"},
        Bad{"gpu[1-[2]]", 6, "nested '['"}, Bad{"gpu[3-1]", 4, "reversed range '3-1'"},
        Bad{"a,,b", 2, "empty host name"}, Bad{",a", 0, "empty host name"},
        Bad{"a,", 2, "trailing ','"}, Bad{"gpu[]", 4, "empty brackets"},
        Bad{"gpu[1,]", 6, "empty item"}, Bad{"gpu[,1]", 4, "empty item"},
        Bad{"gpu[a-c]", 4, "non-numeric range 'a'"}, Bad{"gpu[1-x]", 6, "non-numeric range 'x'"},
        Bad{"gpu[-3]", 4, "range without a start"}, Bad{"gpu[1-]", 6, "range without an end"},
        Bad{"gpu[1-99999999999999]", 6, "number too large"},
        Bad{"gpu[0-18446744073709551615]", 6, "number too large"},  // 2^64 - 1: count() would wrap
        Bad{"n[0-99999999]", 0, "expands to more than 1000 hosts"},
        Bad{"a[1-40]b[1-40]", 0, "expands to more than 1000 hosts"},
        Bad{"a[1-600],b[1-600]", 9, "expands to more than 1000 hosts"},
        Bad{"gpu 1", 3, "whitespace"}));

TEST(HostlistTest, DefaultCapAllowsLargeJobs) {
  EXPECT_EQ(expand_hostlist("n[00001-20000]").size(), 20000u);
  EXPECT_THROW(expand_hostlist("n[0-100000]"), HostlistError);  // 100,001 > the 100k cap
}

// 2^16 hosts times 2^48 is 2^64, which is 0 in uint64: the product must be checked before it is
// formed, or the list passes the cap and the expansion tries to build 2^64 names.
TEST(HostlistTest, HostCountCannotOverflow) {
  std::string second_group;
  for (int i = 0; i < 281; ++i) second_group += "0-999999999999,";  // 281 * 10^12
  second_group += "0-474976710655";                                 // + 474976710656 = 2^48
  const std::string list = "a[1-65536]b[" + second_group + "]";
  try {
    expand_hostlist(list);
    FAIL() << "expected an error";
  } catch (const HostlistError& e) {
    EXPECT_THAT(e.what(), HasSubstr("expands to more than 100000 hosts"));
    EXPECT_EQ(e.position(), 0u);
  }
  // One group alone far beyond the cap, and many groups each within it.
  EXPECT_THROW(expand_hostlist("n[" + second_group + "]"), HostlistError);
  EXPECT_THROW(
      expand_hostlist(
          "a[1-100]b[1-100]c[1-100]d[1-100]e[1-100]f[1-100]g[1-100]h[1-100]i[1-100]j[1-100]"),
      HostlistError);
  // The cap still counts across host patterns.
  EXPECT_EQ(expand_hostlist("a[1-50000],b[1-50000]").size(), 100000u);
  EXPECT_THROW(expand_hostlist("a[1-50000],b[1-50000],c"), HostlistError);
}

// The expansion recurses once per bracket group: an unbounded number of groups overflowed the
// stack ("a" + "[1]" x 300000 crashed).
TEST(HostlistTest, BracketGroupsPerHostAreLimited) {
  std::string sixteen = "a";
  for (int i = 0; i < 16; ++i) sixteen += "[1]";
  EXPECT_THAT(expand_hostlist(sixteen), ElementsAre("a" + std::string(16, '1')));

  std::string hostile = "a";
  for (int i = 0; i < 300000; ++i) hostile += "[1]";
  try {
    expand_hostlist(hostile);
    FAIL() << "expected an error";
  } catch (const HostlistError& e) {
    EXPECT_EQ(e.position(), 1u + 16 * 3);  // the 17th '['
    EXPECT_THAT(e.what(), HasSubstr("more than 16 bracket groups in one host name"));
  }
}

TEST(HostlistTest, HostNamesLongerThan255AreRejected) {
  EXPECT_EQ(expand_hostlist(std::string(255, 'n')).front().size(), 255u);
  EXPECT_EQ(expand_hostlist(std::string(252, 'n') + "[1-999]").back().size(), 255u);
  const std::string too_long = "a," + std::string(253, 'n') + "[1-100]";  // n100 is 256 long
  try {
    expand_hostlist(too_long);
    FAIL() << "expected an error";
  } catch (const HostlistError& e) {
    EXPECT_EQ(e.position(), 2u);  // the start of the offending host pattern
    EXPECT_THAT(e.what(), HasSubstr("host name too long: up to 256 characters, the limit is 255"));
  }
  EXPECT_THROW(expand_hostlist(std::string(256, 'n')), HostlistError);
  EXPECT_THROW(expand_hostlist(std::string(250, 'n') + "[000001-000002]"),
               HostlistError);  // padding counts
}

TEST(HostlistTest, MessageQuotesTheList) {
  try {
    expand_hostlist("gpu[2-1]");
    FAIL();
  } catch (const HostlistError& e) {
    EXPECT_STREQ(e.what(), "hostlist 'gpu[2-1]': position 4: reversed range '2-1'");
  }
}

TEST(HostlistTest, ScontrolFallbackErrorsNameTheCommand) {
  // Outside a Slurm installation scontrol is missing or has no configuration: either way the
  // error must say which command failed, and never hang past the deadline.
  const auto started = std::chrono::steady_clock::now();
  try {
    auto hosts = scontrol_hostnames("n[1-2]", std::chrono::milliseconds(2000));
    EXPECT_THAT(hosts, ElementsAre("n1", "n2"));  // a real Slurm client answered
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("scontrol show hostnames"));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
}

// Hosts end up in URLs ("http://HOST:PORT"): "n2:80" made "http://n2:80:9000".
TEST(HostNameTest, ValidNames) {
  for (const char* good : {"n1", "gpu-a001", "node_1", "N1.Cluster.Local", "127.0.10.1", "0.0.0.0",
                           "255.255.255.255", "a", "1a", "x.y1", "n1.123.example", "a-b_c.d-e"}) {
    EXPECT_EQ(host_name_problem(good), "") << good;
  }
  EXPECT_EQ(host_name_problem(std::string(63, 'a') + "." + std::string(63, 'b')), "");
  std::string longest;  // 253 characters: 63 + 1 + 63 + 1 + 63 + 1 + 61
  for (int i = 0; i < 3; ++i) longest += std::string(63, 'a') + ".";
  longest += std::string(61, 'a');
  ASSERT_EQ(longest.size(), 253u);
  EXPECT_EQ(host_name_problem(longest), "");
}

TEST(HostNameTest, InvalidNamesSayWhy) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {"", "empty name"},
      {"n2:80", "character ':' at offset 2 is not allowed in a host name"},
      {"n2/x", "character '/' at offset 2"},
      {"n2@h", "character '@' at offset 2"},
      {"n2;rm", "character ';' at offset 2"},
      {"h 2", "character ' ' at offset 1"},
      {"h3\r", "byte 0x0d at offset 2"},
      {"n\xc3\xb6", "byte 0xc3 at offset 1"},
      {".", "empty label at offset 0"},
      {".n1", "empty label at offset 0"},
      {"n1.", "empty label at offset 3"},
      {"n1..x", "empty label at offset 3"},
      {"-n1", "label '-n1' at offset 0 starts with '-'"},
      {"n1-.x", "label 'n1-' at offset 0 ends with '-'"},
      {"a." + std::string(64, 'b'), "label at offset 2 is 64 characters long, more than 63"},
      {"1", "the last label is all digits"},
      {"n1.5", "not a dotted quad"},
      {"1.2.3", "not a dotted quad"},
      {"1.2.3.4.5", "not a dotted quad"},
      {"256.1.1.1", "not a dotted quad"},
      {"127.0.10.01", "not a dotted quad"},  // inet_aton reads 01 as octal
      {"0x7f.1", "not a dotted quad"},
  };
  for (const auto& [name, problem] : cases) {
    EXPECT_THAT(host_name_problem(name), HasSubstr(problem)) << quoted_for_message(name);
  }
  std::string too_long;
  for (int i = 0; i < 4; ++i) too_long += std::string(63, 'a') + ".";
  too_long.pop_back();  // 255 characters, each label fine
  EXPECT_EQ(host_name_problem(too_long), "255 characters long, more than 253");
  EXPECT_THAT(host_name_character_problem("-ib"), ::testing::IsEmpty());
  EXPECT_THAT(host_name_character_problem(":80"), HasSubstr("character ':' at offset 0"));
}

TEST(HostlistTest, ExpansionReportsWhereEachHostCameFrom) {
  std::vector<std::size_t> positions;
  EXPECT_THAT(expand_hostlist(" a,n[1-2],b ", kDefaultMaxHosts, &positions),
              ElementsAre("a", "n1", "n2", "b"));
  EXPECT_THAT(positions, ElementsAre(0u, 2u, 2u, 9u));  // counted like HostlistError's positions
}

TEST(HostlistTest, ErrorsQuoteControlCharactersEscaped) {
  EXPECT_EQ(quoted_for_message("a\rb\n\t\x01"), "'a\\rb\\n\\t\\x01'");
  try {
    expand_hostlist("a\rb");
    FAIL();
  } catch (const HostlistError& e) {
    EXPECT_STREQ(e.what(), "hostlist 'a\\rb': position 1: whitespace inside the hostlist");
  }
}

// scontrol's output was taken line by line as host names, unchecked and without a cap.
TEST(ScontrolTest, EveryLineMustBeAHostName) {
  {
    FakeScontrol fake("printf 'h1\\nh 2\\n'");
    EXPECT_THAT(scontrol_error(std::chrono::seconds(10)),
                HasSubstr("line 2 'h 2' is not a host name: character ' ' at offset 1"));
  }
  {
    FakeScontrol fake("printf 'h1\\nh3\\r\\n'");
    const auto message = scontrol_error(std::chrono::seconds(10));
    EXPECT_THAT(message, HasSubstr("line 2 'h3\\r' is not a host name: byte 0x0d at offset 2"));
    EXPECT_EQ(message.find('\r'), std::string::npos);
  }
  {
    FakeScontrol fake("printf 'h1\\n\\nh2\\n'");
    EXPECT_THAT(scontrol_error(std::chrono::seconds(10)),
                HasSubstr("line 2 '' is not a host name: empty name"));
  }
  FakeScontrol fake("printf 'h1\\nh2\\n'");
  EXPECT_THAT(scontrol_hostnames("n[1-", std::chrono::seconds(10)), ElementsAre("h1", "h2"));
}

TEST(ScontrolTest, HostCountIsCapped) {
  {
    FakeScontrol fake("printf 'h1\\nh2\\nh3\\nh4\\n'");
    EXPECT_THAT(scontrol_error(std::chrono::seconds(10), 3),
                HasSubstr("printed more than 3 hosts"));
    EXPECT_EQ(scontrol_hostnames("x", std::chrono::seconds(10), 4).size(), 4u);
  }
  {
    FakeScontrol fake("seq -f 'h%.0f' 1 100001");
    EXPECT_THAT(scontrol_error(std::chrono::seconds(30)),
                HasSubstr("printed more than 100000 hosts"));
  }
  // Endless output is cut off as soon as it exceeds what max_hosts names can take, not at the
  // deadline (nor when memory runs out).
  FakeScontrol fake("exec yes h1");
  const auto started = std::chrono::steady_clock::now();
  EXPECT_THAT(scontrol_error(std::chrono::seconds(20), 3), HasSubstr("printed more than 3 hosts"));
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
}

// poll() takes an int of milliseconds: 2^32 ms cast to 0 ("time out at once"), 2^31 ms to a
// negative value ("wait forever"); milliseconds::max() overflowed the deadline itself.
TEST(ScontrolTest, AnyTimeoutLengthWorks) {
  FakeScontrol fake("sleep 0.3; printf 'h1\\nh2\\n'");
  for (auto timeout : {std::chrono::milliseconds(1LL << 31), std::chrono::milliseconds(1LL << 32),
                       std::chrono::milliseconds(1LL << 40), std::chrono::milliseconds::max()}) {
    EXPECT_THAT(scontrol_hostnames("n[1-2]", timeout), ElementsAre("h1", "h2")) << timeout.count();
  }
  // And a short timeout still fires.
  FakeScontrol slow("exec sleep 10");
  const auto started = std::chrono::steady_clock::now();
  EXPECT_THAT(scontrol_error(std::chrono::milliseconds(200)), HasSubstr("timed out after 200ms"));
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
}

// What scontrol says on its standard error ("Invalid hostlist") is part of the error message,
// and a timeout ends everything it started, not just scontrol itself.
TEST(ScontrolTest, ItsOwnErrorIsQuotedAndATimeoutEndsItsChildren) {
  {
    FakeScontrol fake("echo 'scontrol: error: Invalid hostlist: n[1-' >&2; exit 1");
    EXPECT_THAT(scontrol_error(std::chrono::seconds(10)),
                HasSubstr("failed (exit 1) (scontrol said: 'scontrol: error: Invalid hostlist: n[1-')"));
  }
  {
    FakeScontrol fake("echo 'no controller' >&2");
    EXPECT_THAT(scontrol_error(std::chrono::seconds(10)), HasSubstr("printed no hosts (scontrol said: 'no controller')"));
  }
  const auto pid_file = std::filesystem::temp_directory_path() / ("infergate-scontrol-child-" + std::to_string(::getpid()));
  FakeScontrol fake("sleep 30 & echo $! > '" + pid_file.string() + "'; wait");
  EXPECT_THAT(scontrol_error(std::chrono::milliseconds(2000)), HasSubstr("timed out after 2000ms"));
  int child = 0;
  std::ifstream(pid_file) >> child;
  std::filesystem::remove(pid_file);
  ASSERT_GT(child, 0);
  // Gone, or a zombie waiting for its new parent to reap it: either way no longer running.
  auto running = [child] {
    std::ifstream stat("/proc/" + std::to_string(child) + "/stat");
    std::string pid, name, state;
    return static_cast<bool>(stat >> pid >> name >> state) && state != "Z";
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (running() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_FALSE(running()) << "scontrol's child " << child << " outlived the timeout";
}
