#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include "slurm/hostlist.hpp"
#include "slurm/job.hpp"

using namespace infergate::slurm;
using ::testing::HasSubstr;

namespace {

EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](std::string_view name) -> std::optional<std::string> {
    auto it = vars.find(std::string(name));
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::string error_of(const JobOptions& o, std::map<std::string, std::string> env) {
  try {
    read_job_layout(o, env_of(std::move(env)));
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

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

}  // namespace

TEST(JobLayoutTest, TheIssueExample) {
  auto layout = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "gpu-a[001-003],gpu-b[7,9]"},
                                            {"NUM_TRAINING_NODES", "1"},
                                            {"INFER_TP", "2"}}));
  ASSERT_TRUE(layout);
  EXPECT_EQ(layout->servers_per_node, 4);
  ASSERT_EQ(layout->servers.size(), 16u);
  EXPECT_EQ(layout->servers.front().host, "gpu-a002");
  EXPECT_EQ(layout->servers.front().port, 9000);
  EXPECT_EQ(layout->servers.back().host, "gpu-b9");
  EXPECT_EQ(layout->servers.back().port, 9003);
  EXPECT_EQ(layout->servers.back().slot, 3);
  EXPECT_THAT(layout->training_hosts, ::testing::ElementsAre("gpu-a001"));
  EXPECT_FALSE(layout->training_nodes_defaulted);
}

TEST(JobLayoutTest, OutsideAJobThereIsNoLayout) {
  EXPECT_FALSE(read_job_layout({}, env_of({})));
}

TEST(JobLayoutTest, DefaultsAndFallbackVariables) {
  auto layout = read_job_layout({}, env_of({{"SLURM_NODELIST", "t,i1"}}));
  ASSERT_TRUE(layout);
  EXPECT_EQ(layout->nodelist_source, "SLURM_NODELIST");
  EXPECT_TRUE(layout->training_nodes_defaulted);
  EXPECT_EQ(layout->training_nodes, 1);
  EXPECT_EQ(layout->infer_tp, 1);
  EXPECT_EQ(layout->gpus_per_node, 8);
  EXPECT_TRUE(layout->gpus_per_node_defaulted);
  EXPECT_THAT(layout->gpus_per_node_source, HasSubstr("default"));
  EXPECT_EQ(layout->servers.size(), 8u);
  // SLURM_JOB_NODELIST wins over SLURM_NODELIST.
  auto both = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,j1"}, {"SLURM_NODELIST", "t,i1"}}));
  EXPECT_EQ(both->servers.front().host, "j1");
}

TEST(JobLayoutTest, GpusFromSlurmAndOptionsOverrideEnvironment) {
  auto layout = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i[1-2]"}, {"SLURM_GPUS_ON_NODE", "4"}, {"INFER_TP", "2"}}));
  EXPECT_EQ(layout->servers.size(), 4u);
  JobOptions o;
  o.gpus_per_node = 8;
  o.infer_tp = 4;
  o.training_nodes = 0;
  o.base_port = 8000;
  auto overridden = read_job_layout(o, env_of({{"SLURM_JOB_NODELIST", "t,i[1-2]"}, {"SLURM_GPUS_ON_NODE", "4"}, {"INFER_TP", "2"}}));
  ASSERT_EQ(overridden->servers.size(), 6u);  // 3 hosts (none trains) x 2 servers
  EXPECT_EQ(overridden->servers.front().host, "t");
  EXPECT_EQ(overridden->servers[1].port, 8001);
}

// SLURM_GPUS_ON_NODE describes the gateway's own node (often a CPU or training node); the
// job-wide SLURM_GPUS_PER_NODE describes every node and comes first.
TEST(JobLayoutTest, GpusPerNodePrecedence) {
  const std::map<std::string, std::string> env{{"SLURM_JOB_NODELIST", "t,i1"},
                                               {"SLURM_GPUS_PER_NODE", "gpu:a100:4"},
                                               {"SLURM_GPUS_ON_NODE", "2"}};
  JobOptions configured;
  configured.gpus_per_node = 6;
  auto from_config = read_job_layout(configured, env_of(env));
  EXPECT_EQ(from_config->gpus_per_node, 6);
  EXPECT_EQ(from_config->gpus_per_node_source, "slurm.gpus_per_node");
  EXPECT_FALSE(from_config->gpus_per_node_defaulted);

  auto per_node = read_job_layout({}, env_of(env));
  EXPECT_EQ(per_node->gpus_per_node, 4);
  EXPECT_EQ(per_node->servers.size(), 4u);
  EXPECT_EQ(per_node->gpus_per_node_source, "SLURM_GPUS_PER_NODE='gpu:a100:4'");
  EXPECT_FALSE(per_node->gpus_per_node_defaulted);

  auto on_node_env = env;
  on_node_env.erase("SLURM_GPUS_PER_NODE");
  auto on_node = read_job_layout({}, env_of(on_node_env));
  EXPECT_EQ(on_node->gpus_per_node, 2);
  EXPECT_EQ(on_node->gpus_per_node_source, "SLURM_GPUS_ON_NODE=2");
  EXPECT_FALSE(on_node->gpus_per_node_defaulted);
}

// A variable that is set but counts as unset (a step without GPUs, no job GPUs on this node) is
// named as such: "none of ... is set" alone contradicts the environment the user sees.
TEST(JobLayoutTest, TheDefaultGpuCountNamesVariablesThatCountAsUnset) {
  std::map<std::string, std::string> env{{"SLURM_JOB_NODELIST", "t,i1"}};
  const std::string none =
      "the default: none of slurm.gpus_per_node, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS, SLURM_GPUS_ON_NODE is set";
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node_source, none);
  env["SLURM_GPUS_ON_NODE"] = "0";
  auto zero = read_job_layout({}, env_of(env));
  EXPECT_TRUE(zero->gpus_per_node_defaulted);
  EXPECT_EQ(zero->gpus_per_node, 8);
  EXPECT_EQ(zero->gpus_per_node_source, none + " (SLURM_GPUS_ON_NODE=0 counts as unset)");
  env["SLURM_JOB_GPUS"] = "";
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node_source,
            none + " (SLURM_JOB_GPUS='' and SLURM_GPUS_ON_NODE=0 count as unset)");
  // Empty is unset for every variable alike (a wrapper's `export SLURM_GPUS_ON_NODE=$N` with no N).
  env["SLURM_GPUS_ON_NODE"] = " ";
  env["SLURM_GPUS_PER_NODE"] = "";
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node_source,
            none + " (SLURM_GPUS_PER_NODE='' and SLURM_JOB_GPUS='' and SLURM_GPUS_ON_NODE='' count as unset)");
  env["SLURM_GPUS_ON_NODE"] = "4";
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node, 4);
}

// Under a real Slurm, SLURM_GPUS_ON_NODE is the gateway's own step's: a step run with
// --gres=gpu:1 sees 1 and one with none sees nothing, while SLURM_JOB_GPUS still lists the job's
// GPUs on the node (also for --gres jobs, which set no SLURM_GPUS_PER_NODE).
TEST(JobLayoutTest, JobGpusComeBeforeTheStepsOwnCount) {
  std::map<std::string, std::string> env{{"SLURM_JOB_NODELIST", "t,i1"},
                                         {"SLURM_JOB_GPUS", "0,1,2,3,4,5,6,7"},
                                         {"SLURM_GPUS_ON_NODE", "1"},
                                         {"INFER_TP", "2"}};
  auto layout = read_job_layout({}, env_of(env));
  EXPECT_EQ(layout->gpus_per_node, 8);
  EXPECT_EQ(layout->servers.size(), 4u);
  EXPECT_EQ(layout->gpus_per_node_source, "SLURM_JOB_GPUS='0,1,2,3,4,5,6,7'");

  env["SLURM_JOB_GPUS"] = "0-3,6,7";  // ranges count too
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node, 6);
  env["SLURM_GPUS_PER_NODE"] = "gpu:4";  // the job-wide variable still comes first
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node, 4);
  env.erase("SLURM_GPUS_PER_NODE");
  env["SLURM_JOB_GPUS"] = "";  // no GPUs here: the next variable
  env["SLURM_GPUS_ON_NODE"] = "2";
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node_source, "SLURM_GPUS_ON_NODE=2");
  env["SLURM_GPUS_ON_NODE"] = "0";  // a step run with --gres=gpu:0: says nothing of the job
  auto without = read_job_layout({}, env_of(env));
  EXPECT_EQ(without->gpus_per_node, 8);
  EXPECT_TRUE(without->gpus_per_node_defaulted);
  env["SLURM_JOB_GPUS"] = "0-3";
  EXPECT_EQ(read_job_layout({}, env_of(env))->gpus_per_node, 4);
  env["SLURM_JOB_GPUS"] = "";

  for (const std::string bad : {"0,,1", "a,b", "3-1", "0-1024", "-1", "0, 1"}) {
    env["SLURM_JOB_GPUS"] = bad;
    try {
      read_job_layout({}, env_of(env));
      ADD_FAILURE() << bad << " was accepted";
    } catch (const JobError& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr("SLURM_JOB_GPUS='" + bad + "'")) << e.what();
    }
  }
  // A GPU listed twice, alone or inside a range, is not counted twice.
  for (const std::string twice : {"0,0,0,0", "0-3,2"}) {
    env["SLURM_JOB_GPUS"] = twice;
    try {
      read_job_layout({}, env_of(env));
      ADD_FAILURE() << twice << " was accepted";
    } catch (const JobError& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr("SLURM_JOB_GPUS='" + twice + "'")) << e.what();
      EXPECT_THAT(e.what(), ::testing::HasSubstr(twice == "0,0,0,0" ? "GPU 0 twice" : "GPU 2 twice")) << e.what();
    }
  }
}

TEST(JobLayoutTest, ParseGpusPerNode) {
  EXPECT_EQ(parse_gpus_per_node("4", "X"), 4);
  EXPECT_EQ(parse_gpus_per_node("gpu:4", "X"), 4);
  EXPECT_EQ(parse_gpus_per_node("gpu:a100:4", "X"), 4);
  EXPECT_EQ(parse_gpus_per_node("a100:4", "X"), 4);
  EXPECT_EQ(parse_gpus_per_node("gpu:a100:4,gpu:v100:2", "X"), 6);  // summed: each node has both
  EXPECT_EQ(parse_gpus_per_node("a100:4,2", "X"), 6);
  for (const char* bad :
       {"", "gpu", "gpu:", "gpu:a100", ":4", "gpu::4", "nic:a100:4", "gpu:a100:4:1", "gpu:0",
        "gpu:-1", "gpu:+4", "gpu:4,", ",gpu:4", "gpu:4(S:0-1)", "4 ", "gpu:4x"}) {
    try {
      parse_gpus_per_node(bad, "SLURM_GPUS_PER_NODE='v'");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const JobError& e) {
      EXPECT_THAT(e.what(), HasSubstr("SLURM_GPUS_PER_NODE='v'")) << bad;
    }
  }
  EXPECT_THROW(parse_gpus_per_node("999999999,1", "X"), JobError);
}

TEST(JobLayoutTest, SuffixAndDomainAreAppendedToHosts) {
  JobOptions o;
  o.host_suffix = "-ib";
  o.domain = "cluster.local";
  auto layout = read_job_layout(o, env_of({{"SLURM_JOB_NODELIST", "t,n1"}, {"INFER_TP", "8"}}));
  ASSERT_EQ(layout->servers.size(), 1u);
  EXPECT_EQ(layout->servers[0].host, "n1-ib.cluster.local");
  EXPECT_EQ(layout->servers[0].node, "n1");
  o.domain = ".already.dotted";
  EXPECT_EQ(read_job_layout(o, env_of({{"SLURM_JOB_NODELIST", "t,n1"}, {"INFER_TP", "8"}}))->servers[0].host,
            "n1-ib.already.dotted");
}

// The group read is a component of its own: every host of it serves. NUM_TRAINING_NODES counts
// the job's trainers (another component), so it is not applied to this group's first hosts;
// slurm.training_nodes is.
TEST(JobLayoutTest, HeterogeneousJobGroup) {
  JobOptions o;
  o.het_group = 1;
  const std::map<std::string, std::string> env{{"SLURM_JOB_NODELIST", "x[1-9]"},
                                               {"SLURM_JOB_NODELIST_HET_GROUP_1", "h[1-2]"},
                                               {"SLURM_GPUS_PER_NODE_HET_GROUP_1", "8"},
                                               {"INFER_TP", "8"}};
  auto layout = read_job_layout(o, env_of(env));
  ASSERT_EQ(layout->servers.size(), 2u);
  EXPECT_EQ(layout->servers[0].host, "h1");
  EXPECT_EQ(layout->servers[1].host, "h2");
  EXPECT_EQ(layout->training_nodes, 0);
  EXPECT_THAT(layout->training_nodes_source, HasSubstr("slurm.het_group=1"));
  EXPECT_EQ(layout->nodelist_source, "SLURM_JOB_NODELIST_HET_GROUP_1");
  EXPECT_TRUE(layout->warnings.empty()) << layout->warnings.front();

  auto with_count = env;
  with_count["NUM_TRAINING_NODES"] = "1";
  auto counted = read_job_layout(o, env_of(with_count));
  ASSERT_EQ(counted->servers.size(), 2u);
  ASSERT_EQ(counted->warnings.size(), 1u);
  EXPECT_THAT(counted->warnings[0], HasSubstr("NUM_TRAINING_NODES='1' is not applied to heterogeneous group 1"));
  EXPECT_THAT(counted->warnings[0], HasSubstr("set slurm.training_nodes"));

  auto training = o;
  training.training_nodes = 1;
  auto trained = read_job_layout(training, env_of(with_count));
  ASSERT_EQ(trained->servers.size(), 1u);
  EXPECT_EQ(trained->servers[0].host, "h2");
  EXPECT_TRUE(trained->warnings.empty());
  EXPECT_THAT(error_of(o, {{"SLURM_JOB_NODELIST", "x"}}), HasSubstr("SLURM_JOB_NODELIST_HET_GROUP_1 is not set"));

  // With slurm.nodelist given, the list is not a component: NUM_TRAINING_NODES applies.
  auto listed = o;
  listed.nodelist = "a,b";
  auto given = read_job_layout(listed, env_of(with_count));
  ASSERT_EQ(given->servers.size(), 1u);
  EXPECT_EQ(given->servers[0].host, "b");
}

// Without slurm.het_group, a heterogeneous job's plain nodelist is its first component alone:
// said in a warning, and in the error when that leaves no inference host.
TEST(JobLayoutTest, AHeterogeneousJobReadWithoutItsGroupIsFlagged) {
  EXPECT_THAT(error_of({}, {{"SLURM_HET_SIZE", "2"}, {"SLURM_JOB_NODELIST", "trn1"}}),
              HasSubstr("no host left for inference; this is a heterogeneous job (SLURM_HET_SIZE='2') and "
                        "SLURM_JOB_NODELIST lists its first component only: set slurm.het_group"));
  auto layout = read_job_layout({}, env_of({{"SLURM_HET_SIZE", "2"}, {"SLURM_JOB_NODELIST", "t,i1"},
                                            {"SLURM_GPUS_PER_NODE", "1"}}));
  ASSERT_EQ(layout->servers.size(), 1u);
  ASSERT_EQ(layout->warnings.size(), 1u);
  EXPECT_THAT(layout->warnings[0], HasSubstr("set slurm.het_group (INFERGATE_SLURM_HET_GROUP)"));
  auto plain = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i1"}, {"SLURM_GPUS_PER_NODE", "1"}}));
  EXPECT_TRUE(plain->warnings.empty());
}

// Counts written by a script's $(...) carry a newline; the nodelist already allowed for it.
TEST(JobLayoutTest, WhitespaceAroundCountsIsIgnored) {
  auto layout = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i[1-2]"},
                                            {"NUM_TRAINING_NODES", " 1\n"},
                                            {"INFER_TP", "2\n"},
                                            {"SLURM_GPUS_ON_NODE", "4 "}}));
  ASSERT_TRUE(layout);
  EXPECT_EQ(layout->training_nodes, 1);
  EXPECT_EQ(layout->infer_tp, 2);
  EXPECT_EQ(layout->gpus_per_node, 4);
  EXPECT_EQ(layout->servers.size(), 4u);
}

// An assumed GPU count is a warning: on a node with fewer GPUs, most of the backends it makes
// do not exist.
TEST(JobLayoutTest, AnAssumedGpuCountIsAWarning) {
  auto layout = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i1"}}));
  ASSERT_EQ(layout->warnings.size(), 1u);
  EXPECT_THAT(layout->warnings[0], HasSubstr("assuming 8 GPUs per inference node; set slurm.gpus_per_node"));
  EXPECT_TRUE(read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i1"}, {"SLURM_GPUS_ON_NODE", "4"}}))
                  ->warnings.empty());
}

TEST(JobLayoutTest, EveryBadValueIsAOneLineErrorNamingTheVariable) {
  const std::map<std::string, std::string> base{{"SLURM_JOB_NODELIST", "t,i[1-2]"}};
  auto with = [&](std::string k, std::string v) {
    auto m = base;
    m[k] = v;
    return m;
  };
  EXPECT_THAT(error_of({}, with("INFER_TP", "0")), HasSubstr("INFER_TP='0' is not a positive integer"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "-2")), HasSubstr("INFER_TP='-2' is not a positive integer"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "two")), HasSubstr("INFER_TP='two' is not a positive integer"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "")), HasSubstr("INFER_TP='' is not a positive integer"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "3")), HasSubstr("INFER_TP=3 does not divide the 8 GPUs per node"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "3")),
              HasSubstr("(from the default: none of slurm.gpus_per_node"));
  EXPECT_THAT(
      error_of({}, with("SLURM_GPUS_PER_NODE", "gpu:lots")),
      HasSubstr(
          "SLURM_GPUS_PER_NODE='gpu:lots' is not a GPU count (expected N, gpu:N, gpu:TYPE:N"));
  JobOptions zero_gpus;
  zero_gpus.gpus_per_node = 0;
  EXPECT_THAT(error_of(zero_gpus, base),
              HasSubstr("slurm.gpus_per_node=0 must be a positive integer"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "16")),
              HasSubstr("INFER_TP=16 is more than the 8 GPUs per node (from the default: none of"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "16")), HasSubstr("must fit on one node"));
  // Zero training nodes is allowed (every host serves), so the message says "zero or more".
  EXPECT_THAT(error_of({}, with("NUM_TRAINING_NODES", "x")), HasSubstr("NUM_TRAINING_NODES='x' is not a whole number (zero or more)"));
  EXPECT_THAT(error_of({}, with("NUM_TRAINING_NODES", "-1")), HasSubstr("NUM_TRAINING_NODES='-1' is not a whole number (zero or more)"));
  EXPECT_THAT(error_of({}, with("NUM_TRAINING_NODES", "99999999999")), HasSubstr("NUM_TRAINING_NODES='99999999999' is too large"));
  EXPECT_THAT(error_of({}, with("INFER_TP", "99999999999")), HasSubstr("INFER_TP='99999999999' is too large"));
  // Not a number, however long its digits run before the first other character (the digits were
  // once multiplied up first: a signed overflow; CliTest.BadInputExitsTwoWithOneLine runs this
  // against the sanitizer build).
  EXPECT_THAT(error_of({}, with("INFER_TP", "99999999999x")), HasSubstr("INFER_TP='99999999999x' is not a positive integer"));
  // Zero written with leading zeros is zero, as 01 is one.
  auto base_env = with("NUM_TRAINING_NODES", "00");
  ASSERT_TRUE(read_job_layout({}, env_of(base_env)));
  EXPECT_EQ(read_job_layout({}, env_of(base_env))->training_nodes, 0);
  EXPECT_THAT(error_of({}, with("NUM_TRAINING_NODES", "3")),
              HasSubstr("NUM_TRAINING_NODES=3 but the nodelist 't,i[1-2]' has only 3 host(s): no host left for inference"));
  EXPECT_THAT(error_of({}, with("SLURM_GPUS_ON_NODE", "eight")), HasSubstr("SLURM_GPUS_ON_NODE='eight'"));
  EXPECT_THAT(error_of({}, with("SLURM_JOB_NODELIST", "i[1-")), HasSubstr("SLURM_JOB_NODELIST: hostlist 'i[1-'"));
  JobOptions high_port;
  high_port.base_port = 65530;
  EXPECT_THAT(error_of(high_port, base), HasSubstr("runs past port 65535"));
  for (const auto& msg : {error_of({}, with("INFER_TP", "3")), error_of({}, with("SLURM_JOB_NODELIST", "i[1-"))}) {
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(JobLayoutTest, ZeroTrainingNodesMeansEveryHostServes) {
  auto layout = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "a,b"}, {"NUM_TRAINING_NODES", "0"}, {"INFER_TP", "8"}}));
  ASSERT_EQ(layout->servers.size(), 2u);
  EXPECT_EQ(layout->servers[0].host, "a");
}

TEST(JobLayoutTest, ParsePositiveInt) {
  EXPECT_EQ(parse_positive_int("42", "X"), 42);
  EXPECT_THROW(parse_positive_int("0", "X"), JobError);
  EXPECT_THROW(parse_positive_int("+4", "X"), JobError);
  EXPECT_THROW(parse_positive_int(" 4", "X"), JobError);
  EXPECT_THROW(parse_positive_int("99999999999", "X"), JobError);
}

// SLURM_GPUS_PER_NODE was accepted up to 999,999,999 while slurm.gpus_per_node stops at 1024.
TEST(JobLayoutTest, GpuCountsAreCappedLikeTheConfigKey) {
  const std::map<std::string, std::string> base{{"SLURM_JOB_NODELIST", "t,i1"}};
  auto with = [&](std::string k, std::string v) {
    auto m = base;
    m[k] = v;
    return m;
  };
  EXPECT_EQ(read_job_layout({}, env_of(with("SLURM_GPUS_PER_NODE", "1024")))->gpus_per_node, 1024);
  EXPECT_EQ(read_job_layout({}, env_of(with("SLURM_GPUS_ON_NODE", "1024")))->gpus_per_node, 1024);
  EXPECT_THAT(error_of({}, with("SLURM_GPUS_PER_NODE", "1025")),
              HasSubstr("SLURM_GPUS_PER_NODE='1025' is more than 1024 GPUs per node (the limit of "
                        "slurm.gpus_per_node)"));
  EXPECT_THAT(error_of({}, with("SLURM_GPUS_PER_NODE", "gpu:a100:1000,gpu:v100:25")),
              HasSubstr("SLURM_GPUS_PER_NODE='gpu:a100:1000,gpu:v100:25' is more than 1024"));
  EXPECT_THAT(error_of({}, with("SLURM_GPUS_PER_NODE", "999999999")),
              HasSubstr("is more than 1024"));
  EXPECT_THAT(error_of({}, with("SLURM_GPUS_ON_NODE", "1025")),
              HasSubstr("SLURM_GPUS_ON_NODE='1025' is more than 1024 GPUs per node"));
  JobOptions too_many;
  too_many.gpus_per_node = 1025;
  EXPECT_THAT(error_of(too_many, base), HasSubstr("slurm.gpus_per_node=1025 is more than 1024"));
  EXPECT_THROW(parse_gpus_per_node("1025", "X"), JobError);
}

// n[0-99999] x 1000 GPUs built 99,999,000 servers (tens of GB) and ended in std::bad_alloc.
TEST(JobLayoutTest, BackendCountIsCappedBeforeAnythingIsBuilt) {
  auto exact = read_job_layout(
      {}, env_of({{"SLURM_JOB_NODELIST", "n[0-20000]"}, {"SLURM_GPUS_PER_NODE", "5"}}));
  ASSERT_TRUE(exact);
  EXPECT_EQ(exact->servers.size(), kMaxBackends);  // 20,000 inference hosts x 5

  EXPECT_EQ(error_of({}, {{"SLURM_JOB_NODELIST", "n[0-20001]"}, {"SLURM_GPUS_PER_NODE", "5"}}),
            "SLURM_JOB_NODELIST 'n[0-20001]': 20001 inference host(s) x 5 server(s) per node = "
            "100005 inference servers, more than the limit of 100000; servers per node = 5 GPUs "
            "per node from SLURM_GPUS_PER_NODE='5' / the default INFER_TP=1 (neither INFER_TP nor "
            "slurm.infer_tp is set)");
  EXPECT_THAT(error_of({}, {{"SLURM_JOB_NODELIST", "n[0-99999]"},
                            {"NUM_TRAINING_NODES", "1"},
                            {"SLURM_GPUS_PER_NODE", "1000"}}),
              HasSubstr("99999 inference host(s) x 1000 server(s) per node = 99999000 inference "
                        "servers, more than the limit of 100000"));
  JobOptions tp;
  tp.infer_tp = 2;
  EXPECT_THAT(error_of(tp, {{"SLURM_JOB_NODELIST", "n[0-99999]"}, {"SLURM_GPUS_ON_NODE", "1024"}}),
              HasSubstr("/ slurm.infer_tp=2"));
}

// "n2:80" became "http://n2:80:9000"; suffixes and domains were not checked either.
TEST(JobLayoutTest, EveryHostMustBeAValidHostName) {
  const auto nodelist = [](std::string list) {
    return std::map<std::string, std::string>{{"SLURM_JOB_NODELIST", std::move(list)},
                                              {"NUM_TRAINING_NODES", "1"},
                                              {"SLURM_GPUS_PER_NODE", "1"}};
  };
  EXPECT_EQ(error_of({}, nodelist("n1,n2:80")),
            "SLURM_JOB_NODELIST 'n1,n2:80': host 'n2:80' at position 3 is not a valid host name: "
            "character ':' at offset 2 is not allowed in a host name (only ASCII letters, digits, "
            "'-', '_' and '.')");
  for (const auto& [list, problem] : std::vector<std::pair<std::string, std::string>>{
           {"n1,n2/x", "host 'n2/x' at position 3"},
           {"n2@h,n1", "host 'n2@h' at position 0"},  // a training host is checked too
           {"n1,n2;rm", "host 'n2;rm' at position 3"},
           {"n1,n\xc3\xb6", "byte 0xc3 at offset 1"},
           {"n1,.", "host '.' at position 3 is not a valid host name: empty label"},
           {"n1,x[1-2].", "host 'x1.' at position 3"},
           {"n1,-x", "starts with '-'"},
           {"n1,7",
            "host '7' at position 3 is not a valid host name: the last label is all digits"},
       }) {
    EXPECT_THAT(error_of({}, nodelist(list)), HasSubstr(problem)) << list;
  }
  // The demo's loopback addresses, and '_' that some clusters use, are fine.
  EXPECT_EQ(read_job_layout({}, env_of(nodelist("127.0.10.[1-3]")))->servers.back().host,
            "127.0.10.3");
  EXPECT_EQ(read_job_layout({}, env_of(nodelist("t,gpu_a[1-2]")))->servers.back().host, "gpu_a2");

  JobOptions suffix;
  suffix.host_suffix = ":80";
  EXPECT_THAT(error_of(suffix, nodelist("t,n1")),
              HasSubstr("slurm.host_suffix=':80': character ':' at offset 0 is not allowed"));
  suffix.origins["slurm.host_suffix"] = "INFERGATE_SLURM_HOST_SUFFIX";
  EXPECT_THAT(
      error_of(suffix, nodelist("t,n1")),
      HasSubstr("slurm.host_suffix=':80' (from INFERGATE_SLURM_HOST_SUFFIX): character ':'"));
  JobOptions domain;
  domain.domain = "cluster local";
  EXPECT_THAT(
      error_of(domain, nodelist("t,n1")),
      HasSubstr("slurm.domain='cluster local' is not a valid domain: character ' ' at offset 7"));
  domain.domain = "a..b";
  EXPECT_THAT(error_of(domain, nodelist("t,n1")),
              HasSubstr("slurm.domain='a..b' is not a valid domain: empty label"));
  // Valid parts that make an invalid whole name: the error shows how the name was made.
  JobOptions long_label;
  const std::string x61(61, 'x');
  long_label.host_suffix = "-" + x61;
  long_label.domain = "example";
  // 't' + suffix is 63 characters, the limit; 'n1' + suffix is one more.
  const std::string host = "n1-" + x61 + ".example";
  const std::string made_of =
      "(node 'n1' at position 2 + slurm.host_suffix '-" + x61 + "' + slurm.domain 'example')";
  EXPECT_EQ(error_of(long_label, nodelist("t,n1")),
            "SLURM_JOB_NODELIST 't,n1': host '" + host + "' " + made_of +
                " is not a valid host name: label at offset 0 is 64 characters long, more than 63");
}

// n1,n1,n2 with NUM_TRAINING_NODES=1 made the training node an inference backend.
TEST(JobLayoutTest, AHostListedTwiceIsAnError) {
  const auto nodelist = [](std::string list) {
    return std::map<std::string, std::string>{{"SLURM_JOB_NODELIST", std::move(list)},
                                              {"NUM_TRAINING_NODES", "1"}};
  };
  EXPECT_EQ(
      error_of({}, nodelist("n1,n1,n2")),
      "SLURM_JOB_NODELIST 'n1,n1,n2': host 'n1' is listed twice (at position 0 and at "
      "position 3); Slurm never lists a node twice in a job, so this is not the job's nodelist");
  EXPECT_THAT(error_of({}, nodelist("n[1,1,2]")),
              HasSubstr("host 'n1' is listed twice (both at position 0)"));
  EXPECT_THAT(error_of({}, nodelist("n[1-3],n2")),
              HasSubstr("host 'n2' is listed twice (at position 0 and at position 7)"));
  EXPECT_THAT(error_of({}, nodelist("N1,n1")),
              HasSubstr("hosts 'N1' (at position 0) and 'n1' (at position 3) are the same host"));
  JobOptions from_config;
  from_config.nodelist = "a,b,a";
  from_config.origins["slurm.nodelist"] = "/etc/infergate.yaml";
  EXPECT_THAT(
      error_of(from_config, {}),
      HasSubstr("slurm.nodelist (from /etc/infergate.yaml) 'a,b,a': host 'a' is listed twice"));
}

// slurm.training_nodes: 5 from a file read "NUM_TRAINING_NODES=5 but ...", slurm.infer_tp: 3
// "INFER_TP=3 ...", and the default "NUM_TRAINING_NODES=1 but ..." as if it had been set.
TEST(JobLayoutTest, LayoutErrorsNameWhereTheValueCameFrom) {
  const std::map<std::string, std::string> one_host{{"SLURM_JOB_NODELIST", "n1"}};
  EXPECT_EQ(error_of({}, one_host),
            "the default NUM_TRAINING_NODES=1 (neither NUM_TRAINING_NODES nor slurm.training_nodes "
            "is set) but the nodelist 'n1' has only 1 host(s): no host left for inference");
  EXPECT_THAT(error_of({}, {{"SLURM_JOB_NODELIST", "n1"}, {"NUM_TRAINING_NODES", "5"}}),
              HasSubstr("NUM_TRAINING_NODES=5 but the nodelist 'n1'"));
  JobOptions configured;
  configured.training_nodes = 5;
  EXPECT_THAT(error_of(configured, one_host),
              HasSubstr("slurm.training_nodes=5 but the nodelist 'n1'"));
  EXPECT_THAT(error_of(configured, {{"SLURM_JOB_NODELIST", "n1"}, {"NUM_TRAINING_NODES", "0"}}),
              HasSubstr("slurm.training_nodes=5 but"));  // the key wins over the variable
  configured.origins["slurm.training_nodes"] = "INFERGATE_SLURM_TRAINING_NODES";
  EXPECT_THAT(
      error_of(configured, one_host),
      HasSubstr("slurm.training_nodes=5 (from INFERGATE_SLURM_TRAINING_NODES) but the nodelist"));

  const std::map<std::string, std::string> two_hosts{{"SLURM_JOB_NODELIST", "t,n1"}};
  JobOptions tp;
  tp.infer_tp = 3;
  EXPECT_THAT(error_of(tp, two_hosts),
              HasSubstr("slurm.infer_tp=3 does not divide the 8 GPUs per node"));
  tp.origins["slurm.infer_tp"] = "/etc/infergate.yaml";
  EXPECT_THAT(
      error_of(tp, two_hosts),
      HasSubstr("slurm.infer_tp=3 (from /etc/infergate.yaml) does not divide the 8 GPUs per node"));
  tp.gpus_per_node = 4;
  tp.origins["slurm.gpus_per_node"] = "--config x.yaml";
  EXPECT_THAT(error_of(tp, two_hosts),
              HasSubstr("(from slurm.gpus_per_node (from --config x.yaml))"));
  JobOptions port;
  port.base_port = 65530;
  port.origins["slurm.base_port"] = "INFERGATE_SLURM_BASE_PORT";
  EXPECT_THAT(
      error_of(port, two_hosts),
      HasSubstr("slurm.base_port=65530 (from INFERGATE_SLURM_BASE_PORT) with 8 servers per node"));

  auto layout = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,n1"}, {"INFER_TP", "2"}}));
  EXPECT_EQ(layout->infer_tp_source, "INFER_TP=2");
  EXPECT_THAT(layout->training_nodes_source, HasSubstr("the default NUM_TRAINING_NODES=1"));
}

// In a heterogeneous job the plain SLURM_GPUS_PER_NODE describes the first component; the
// group's own variables describe the servers' nodes.
TEST(JobLayoutTest, HeterogeneousJobGroupGpuVariables) {
  JobOptions o;
  o.het_group = 1;
  const std::map<std::string, std::string> base{{"SLURM_JOB_NODELIST", "x1"},
                                                {"SLURM_JOB_NODELIST_HET_GROUP_1", "h[1-2]"},
                                                {"SLURM_GPUS_PER_NODE", "8"},
                                                {"SLURM_GPUS_ON_NODE", "6"}};
  auto with = [&](std::map<std::string, std::string> extra) {
    auto m = base;
    for (auto& [k, v] : extra) m[k] = v;
    return read_job_layout(o, env_of(m));
  };
  auto per_node = with(
      {{"SLURM_GPUS_PER_NODE_HET_GROUP_1", "gpu:h100:2"}, {"SLURM_GPUS_ON_NODE_HET_GROUP_1", "4"}});
  EXPECT_EQ(per_node->gpus_per_node, 2);
  EXPECT_EQ(per_node->servers.size(), 4u);  // both hosts of the group serve
  EXPECT_EQ(per_node->gpus_per_node_source, "SLURM_GPUS_PER_NODE_HET_GROUP_1='gpu:h100:2'");
  EXPECT_TRUE(per_node->warnings.empty());
  auto on_node = with({{"SLURM_GPUS_ON_NODE_HET_GROUP_1", "4"}});
  EXPECT_EQ(on_node->gpus_per_node, 4);
  EXPECT_EQ(on_node->gpus_per_node_source, "SLURM_GPUS_ON_NODE_HET_GROUP_1=4");
  auto plain = with({});  // falls back to the plain variables
  EXPECT_EQ(plain->gpus_per_node, 8);
  EXPECT_EQ(plain->gpus_per_node_source, "SLURM_GPUS_PER_NODE='8'");
  ASSERT_EQ(plain->warnings.size(), 1u);  // the first component's count may not be this group's
  EXPECT_THAT(plain->warnings[0], HasSubstr("GPUs per node for heterogeneous group 1 taken from "
                                            "SLURM_GPUS_PER_NODE='8', which describes the job's first component: "
                                            "SLURM_GPUS_PER_NODE_HET_GROUP_1 is not set (Slurm sets it for "
                                            "--gpus-per-node only)"));
  // Another group's variables are not this group's.
  auto other = with({{"SLURM_GPUS_PER_NODE_HET_GROUP_0", "1"}});
  EXPECT_EQ(other->gpus_per_node, 8);
  // Bad values name the group's variable; the default names every variable looked at.
  EXPECT_THAT(error_of(o, {{"SLURM_JOB_NODELIST_HET_GROUP_1", "h[1-2]"},
                           {"SLURM_GPUS_PER_NODE_HET_GROUP_1", "lots"}}),
              HasSubstr("SLURM_GPUS_PER_NODE_HET_GROUP_1='lots' is not a GPU count"));
  EXPECT_THAT(error_of(o, {{"SLURM_JOB_NODELIST_HET_GROUP_1", "h[1-2]"},
                           {"SLURM_GPUS_ON_NODE_HET_GROUP_1", "2000"}}),
              HasSubstr("SLURM_GPUS_ON_NODE_HET_GROUP_1='2000' is more than 1024"));
  auto defaulted = read_job_layout(o, env_of({{"SLURM_JOB_NODELIST_HET_GROUP_1", "h[1-2]"}}));
  EXPECT_TRUE(defaulted->gpus_per_node_defaulted);
  EXPECT_EQ(defaulted->gpus_per_node_source,
            "the default: none of slurm.gpus_per_node, SLURM_GPUS_PER_NODE_HET_GROUP_1, "
            "SLURM_GPUS_ON_NODE_HET_GROUP_1, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS, SLURM_GPUS_ON_NODE is set");
}

// The scontrol fallback's hosts go through the same checks, with line numbers for positions.
TEST(JobLayoutTest, ScontrolFallbackHostsAreCheckedAndCapped) {
  JobOptions o;
  o.use_scontrol = true;
  const std::map<std::string, std::string> odd{{"SLURM_JOB_NODELIST", "odd[1-"},
                                               {"NUM_TRAINING_NODES", "1"}};
  {
    FakeScontrol fake("printf 'h1\\nh2\\nh3\\n'");
    auto layout = read_job_layout(o, env_of(odd));
    ASSERT_TRUE(layout);
    EXPECT_THAT(layout->inference_hosts, ::testing::ElementsAre("h2", "h3"));
  }
  {
    FakeScontrol fake("printf 'h1\\nh 2\\n'");
    EXPECT_THAT(error_of(o, odd), HasSubstr("scontrol fallback: scontrol show hostnames 'odd[1-': "
                                            "line 2 'h 2' is not a host name"));
  }
  {
    FakeScontrol fake("printf 'h1\\nh2\\nh1\\n'");
    EXPECT_THAT(error_of(o, odd),
                HasSubstr("SLURM_JOB_NODELIST 'odd[1-': host 'h1' is listed twice (on line 1 of "
                          "scontrol's expansion and on line 3 of scontrol's expansion)"));
  }
  {
    FakeScontrol fake("printf 'h1\\nh2\\n'");
    JobOptions suffixed = o;
    suffixed.host_suffix = "-";
    EXPECT_THAT(
        error_of(suffixed, odd),
        HasSubstr(
            "host 'h1-' (node 'h1' on line 1 of scontrol's expansion + slurm.host_suffix '-')"));
  }
  FakeScontrol fake("seq -f 'h%.0f' 1 100001");
  EXPECT_THAT(error_of(o, odd), HasSubstr("printed more than 100000 hosts"));
}

// --gpus N is a total Slurm may spread unevenly (checked on Slurm 22.05: 4, 1 and 1 over three
// nodes): a count read from this node's GPUs is then a guess, and said to be one.
TEST(JobLayoutTest, AGpuTotalForTheJobMakesThisNodesCountAWarning) {
  auto spread = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i[1-2]"}, {"SLURM_JOB_GPUS", "0,1,2,3"},
                                            {"SLURM_GPUS", "6"}}));
  EXPECT_EQ(spread->gpus_per_node, 4);
  ASSERT_EQ(spread->warnings.size(), 1u);
  EXPECT_THAT(spread->warnings[0],
              HasSubstr("GPUs per node taken from SLURM_JOB_GPUS='0,1,2,3', which describes this node only, but the "
                        "job asked for '6' GPUs in all (--gpus)"));
  auto per_node = read_job_layout({}, env_of({{"SLURM_JOB_NODELIST", "t,i[1-2]"}, {"SLURM_GPUS_PER_NODE", "4"},
                                              {"SLURM_JOB_GPUS", "0,1,2,3"}, {"SLURM_GPUS", "12"}}));
  EXPECT_TRUE(per_node->warnings.empty());
}

// Without slurm.het_group, any layout error in a heterogeneous job carries the hint that the
// first component was read, not only the one that leaves no inference host.
TEST(JobLayoutTest, EveryLayoutErrorOfAHeterogeneousJobReadWithoutItsGroupHasTheHint) {
  EXPECT_THAT(error_of({}, {{"SLURM_HET_SIZE", "2"}, {"SLURM_JOB_NODELIST", "t,i1"}, {"SLURM_JOB_GPUS", "0"},
                            {"INFER_TP", "2"}}),
              HasSubstr("INFER_TP=2 is more than the 1 GPUs per node (from SLURM_JOB_GPUS='0'): a server's "
                        "tensor-parallel group must fit on one node; this is a heterogeneous job"));
}
