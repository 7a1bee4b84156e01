// The Slurm job's layout: which hosts train, which serve inference, on which ports.
// Reads SLURM_JOB_NODELIST, NUM_TRAINING_NODES, INFER_TP, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS,
// SLURM_GPUS_ON_NODE
// (and their _HET_GROUP_<N> forms in a heterogeneous job).
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
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

// The most GPUs a node may have, from any variable: the limit of the key slurm.gpus_per_node.
inline constexpr int kMaxGpusPerNode = 1024;
// The most inference servers (inference hosts x servers per node) a layout may have, checked
// before any is built: a typo such as SLURM_GPUS_PER_NODE=1000 on a large job would otherwise
// try to allocate tens of GB.
inline constexpr std::size_t kMaxBackends = 100'000;

// Settings that come from configuration; each optional one falls back to the environment.
struct JobOptions {
  std::optional<std::string> nodelist;     // else SLURM_JOB_NODELIST, else SLURM_NODELIST
  std::optional<int> training_nodes;       // else NUM_TRAINING_NODES, else 1
  std::optional<int> infer_tp;             // else INFER_TP, else 1
  std::optional<int> gpus_per_node;        // else SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS, SLURM_GPUS_ON_NODE, 8
  int base_port = 9000;
  std::string host_suffix;                 // appended to each host name, e.g. "-ib"
  std::string domain;                      // appended after the suffix, e.g. ".cluster.local"
  std::optional<int> het_group;            // read SLURM_JOB_NODELIST_HET_GROUP_<N> instead
  bool use_scontrol = false;               // fall back to `scontrol show hostnames`
  std::chrono::milliseconds scontrol_timeout{5000};
  // Where the configuration found each key that is set above, for error messages: key ->
  // origin, e.g. {"slurm.training_nodes", "INFERGATE_SLURM_TRAINING_NODES"} or
  // {"slurm.infer_tp", "/etc/infergate.yaml"}. Errors then read
  // "slurm.training_nodes=5 (from INFERGATE_SLURM_TRAINING_NODES) but ..."; a key without an
  // entry is named alone ("slurm.training_nodes=5 but ...").
  std::map<std::string, std::string, std::less<>> origins;
};

struct InferenceServer {
  std::string host;  // with suffix and domain applied
  std::string node;  // the Slurm node name as in the nodelist
  int slot = 0;      // port index on the node: port = base_port + slot
  int port = 0;
};

struct JobLayout {
  std::string nodelist;  // as read, without the whitespace around it (a trailing newline)
  std::string nodelist_source;  // e.g. "SLURM_JOB_NODELIST" or "config slurm.nodelist"
  std::vector<std::string> training_hosts;
  std::vector<std::string> inference_hosts;
  int training_nodes = 1;
  bool training_nodes_defaulted = false;  // NUM_TRAINING_NODES was unset: callers log it
  // Where training_nodes and infer_tp came from, for logs and errors: "NUM_TRAINING_NODES=2",
  // "slurm.training_nodes=2 (from ORIGIN)" or "the default NUM_TRAINING_NODES=1 (...)".
  std::string training_nodes_source;
  int infer_tp = 1;
  std::string infer_tp_source;
  int gpus_per_node = 8;
  // Where gpus_per_node came from, for logs and errors: "slurm.gpus_per_node" (with
  // " (from ORIGIN)" when known), "SLURM_GPUS_PER_NODE='gpu:a100:4'", "SLURM_GPUS_ON_NODE=4",
  // their _HET_GROUP_<N> forms, or "the default: ...".
  std::string gpus_per_node_source;
  bool gpus_per_node_defaulted = false;  // no setting nor variable gave it: callers log it
  int servers_per_node = 8;
  std::vector<InferenceServer> servers;  // node-major order: node0 slot0, node0 slot1, ...
  // Guesses the layout rests on that may be wrong for this job (callers log them as warnings):
  // a GPU count assumed or read from another component's variables, a heterogeneous job read
  // without slurm.het_group, NUM_TRAINING_NODES set but not applied to a component.
  std::vector<std::string> warnings;
};

// Parses a strictly positive decimal integer; throws JobError naming `what` otherwise.
int parse_positive_int(std::string_view text, std::string_view what);

// The GPU count in a SLURM_GPUS_PER_NODE value: "4", "gpu:4", "gpu:a100:4", "a100:4", or a comma
// list of those ("gpu:a100:4,gpu:v100:2"), which is summed: each node has all of them. Throws
// JobError naming `what` otherwise, or when the count is above kMaxGpusPerNode.
int parse_gpus_per_node(std::string_view text, std::string_view what);

// nullopt when no nodelist is known (not inside a Slurm job). Throws JobError, one line naming
// the value, its variable or key, and the problem: a malformed nodelist, a host that is not a
// valid host name (host_name_problem) once slurm.host_suffix and slurm.domain are appended, a
// host listed twice, a bad count, more than kMaxBackends servers.
std::optional<JobLayout> read_job_layout(const JobOptions& options, const EnvLookup& env);

}  // namespace infergate::slurm
