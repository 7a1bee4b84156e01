#include <gmock/gmock.h>
#include <gtest/gtest.h>

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
