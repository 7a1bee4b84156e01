// The Slurm job's layout: which hosts train, which serve inference, on which ports.
// Reads SLURM_JOB_NODELIST, NUM_TRAINING_NODES, INFER_TP, SLURM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace infergate::slurm {

// A bad value in the job's environment or settings. what() is one line naming the variable.
class JobError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Returns the value of an environment variable, or nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(std::string_view)>;
EnvLookup process_env();

// Settings that come from configuration; each optional one falls back to the environment.
struct JobOptions {
  std::optional<std::string> nodelist;     // else SLURM_JOB_NODELIST, else SLURM_NODELIST
  std::optional<int> training_nodes;       // else NUM_TRAINING_NODES, else 1
  std::optional<int> infer_tp;             // else INFER_TP, else 1
  std::optional<int> gpus_per_node;        // else SLURM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE, 8
  int base_port = 9000;
  std::string host_suffix;                 // appended to each host name, e.g. "-ib"
  std::string domain;                      // appended after the suffix, e.g. ".cluster.local"
  std::optional<int> het_group;            // read SLURM_JOB_NODELIST_HET_GROUP_<N> instead
  bool use_scontrol = false;               // fall back to `scontrol show hostnames`
  std::chrono::milliseconds scontrol_timeout{5000};
};

struct InferenceServer {
  std::string host;  // with suffix and domain applied
  std::string node;  // the Slurm node name as in the nodelist
  int slot = 0;      // port index on the node: port = base_port + slot
  int port = 0;
};

struct JobLayout {
  std::string nodelist;  // as read
  std::string nodelist_source;  // e.g. "SLURM_JOB_NODELIST" or "config slurm.nodelist"
  std::vector<std::string> training_hosts;
  std::vector<std::string> inference_hosts;
  int training_nodes = 1;
  bool training_nodes_defaulted = false;  // NUM_TRAINING_NODES was unset: callers log it
  int infer_tp = 1;
  int gpus_per_node = 8;
  // Where gpus_per_node came from, for logs and errors: "slurm.gpus_per_node",
  // "SLURM_GPUS_PER_NODE='gpu:a100:4'", "SLURM_GPUS_ON_NODE=4" or "the default: ...".
  std::string gpus_per_node_source;
  bool gpus_per_node_defaulted = false;  // no setting nor variable gave it: callers log it
  int servers_per_node = 8;
  std::vector<InferenceServer> servers;  // node-major order: node0 slot0, node0 slot1, ...
};

// Parses a strictly positive decimal integer; throws JobError naming `what` otherwise.
int parse_positive_int(std::string_view text, std::string_view what);

// The GPU count in a SLURM_GPUS_PER_NODE value: "4", "gpu:4", "gpu:a100:4", "a100:4", or a comma
// list of those ("gpu:a100:4,gpu:v100:2"), which is summed: each node has all of them. Throws
// JobError naming `what` otherwise.
int parse_gpus_per_node(std::string_view text, std::string_view what);

// nullopt when no nodelist is known (not inside a Slurm job). Throws JobError or HostlistError.
std::optional<JobLayout> read_job_layout(const JobOptions& options, const EnvLookup& env);

}  // namespace infergate::slurm
