#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>

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

TEST(JobLayoutTest, HeterogeneousJobGroup) {
  JobOptions o;
  o.het_group = 1;
  auto layout = read_job_layout(o, env_of({{"SLURM_JOB_NODELIST", "x[1-9]"},
                                           {"SLURM_JOB_NODELIST_HET_GROUP_1", "h[1-2]"},
                                           {"INFER_TP", "8"}}));
  ASSERT_EQ(layout->servers.size(), 1u);
  EXPECT_EQ(layout->servers[0].host, "h2");
  EXPECT_EQ(layout->nodelist_source, "SLURM_JOB_NODELIST_HET_GROUP_1");
  EXPECT_THAT(error_of(o, {{"SLURM_JOB_NODELIST", "x"}}), HasSubstr("SLURM_JOB_NODELIST_HET_GROUP_1 is not set"));
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
  EXPECT_THAT(error_of({}, with("INFER_TP", "16")), HasSubstr("INFER_TP=16 does not divide"));
  EXPECT_THAT(error_of({}, with("NUM_TRAINING_NODES", "x")), HasSubstr("NUM_TRAINING_NODES='x' is not a positive integer"));
  EXPECT_THAT(error_of({}, with("NUM_TRAINING_NODES", "-1")), HasSubstr("NUM_TRAINING_NODES='-1'"));
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
