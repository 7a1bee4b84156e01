#include "slurm/job.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <set>

#include "slurm/hostlist.hpp"

namespace infergate::slurm {
namespace {

std::string quoted(std::string_view s) {
  return quoted_for_message(s);
}

// " (from ORIGIN)" when the configuration said where the key's value came from, else empty.
std::string origin_of(const JobOptions& options, std::string_view key) {
  auto it = options.origins.find(key);
  if (it == options.origins.end() || it->second.empty()) return {};
  return " (from " + it->second + ")";
}

// "KEY=VALUE (from ORIGIN)", naming a configured value in an error.
std::string setting(const JobOptions& options, std::string_view key, std::string_view value) {
  std::string text(key);
  text += '=';
  text += value;
  text += origin_of(options, key);
  return text;
}

std::string_view trimmed(std::string_view text) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front())))
    text.remove_prefix(1);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
    text.remove_suffix(1);
  return text;
}

struct Resolved {
  int value = 0;
  std::string source;  // "VAR=N", "KEY=N (from ORIGIN)" or "the default VAR=N (...)"
  bool defaulted = false;
};

// A value from the options, else from the environment variable, else the default.
Resolved resolve_int(const JobOptions& options, const std::optional<int>& option,
                     std::string_view option_key, const EnvLookup& env, std::string_view var,
                     int fallback, bool allow_zero) {
  if (option) {
    const auto source = setting(options, option_key, std::to_string(*option));
    if (*option < (allow_zero ? 0 : 1)) {
      throw JobError(source + " must be " + (allow_zero ? "zero or more" : "a positive integer"));
    }
    return {*option, source, false};
  }
  auto value = env(var);
  if (value) value = std::string(trimmed(*value));  // "2\n" from a script's $(...)
  if (!value) {
    return {fallback,
            "the default " + std::string(var) + "=" + std::to_string(fallback) + " (neither " +
                std::string(var) + " nor " + std::string(option_key) + " is set)",
            true};
  }
  const auto what = std::string(var) + "=" + quoted(*value);
  int parsed = 0;
  const bool zero = !value->empty() && value->find_first_not_of('0') == std::string::npos;  // "0", "00"
  if (!allow_zero || !zero) {
    try {
      parsed = parse_positive_int(*value, what);
    } catch (const JobError& e) {
      if (!allow_zero || std::string_view(e.what()).ends_with("too large")) throw;
      throw JobError(what + " is not a whole number (zero or more)");
    }
  }
  return {parsed, std::string(var) + "=" + std::to_string(parsed), false};
}

// The number of GPUs in a SLURM_JOB_GPUS value: indices ("0,1,2,3"), ranges allowed ("0-3").
// Slurm lists each GPU once; an index given twice is a value not made by Slurm.
int count_gpu_indices(std::string_view value, const std::string& what) {
  int count = 0;
  std::set<int> seen;
  std::size_t start = 0;
  while (start <= value.size()) {
    const auto end = std::min(value.find(',', start), value.size());
    const auto item = value.substr(start, end - start);
    const auto dash = item.find('-');
    auto index = [&](std::string_view digits) {
      int n = -1;
      const bool digits_only = !digits.empty() && digits.size() <= 6 &&
                               std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
      if (digits_only) std::from_chars(digits.data(), digits.data() + digits.size(), n);
      if (n < 0) throw JobError(what + ": expected GPU indices such as 0,1,2,3, not '" + std::string(item) + "'");
      return n;
    };
    const int first = index(item.substr(0, dash));
    const int last = dash == std::string_view::npos ? first : index(item.substr(dash + 1));
    if (last < first) throw JobError(what + ": the range '" + std::string(item) + "' runs backwards");
    count += last - first + 1;
    if (count > kMaxGpusPerNode) {
      throw JobError(what + " lists more than " + std::to_string(kMaxGpusPerNode) +
                     " GPUs (the limit of slurm.gpus_per_node)");
    }
    for (int gpu = first; gpu <= last; ++gpu) {
      if (!seen.insert(gpu).second) {
        throw JobError(what + " lists GPU " + std::to_string(gpu) +
                       " twice; Slurm lists each GPU once, so this is not the job's GPU list");
      }
    }
    start = end + 1;
  }
  return count;
}

// GPUs per inference node. SLURM_GPUS_ON_NODE describes the GPUs of the gateway's own step on
// its own node, which may be a CPU or training node, and a step that asked for fewer GPUs (or
// none) sees fewer; so the job-wide SLURM_GPUS_PER_NODE (set by --gpus-per-node) comes first,
// then SLURM_JOB_GPUS (the job's GPUs on this node, whatever the step asked: set by --gres too).
// In a heterogeneous job the plain variables describe the first component, so the chosen group's
// own _HET_GROUP_<N> variables come before all of them.
void resolve_gpus_per_node(const JobOptions& options, const EnvLookup& env, JobLayout& layout) {
  if (options.gpus_per_node) {
    const auto source =
        setting(options, "slurm.gpus_per_node", std::to_string(*options.gpus_per_node));
    if (*options.gpus_per_node < 1) throw JobError(source + " must be a positive integer");
    if (*options.gpus_per_node > kMaxGpusPerNode) {
      throw JobError(source + " is more than " + std::to_string(kMaxGpusPerNode) +
                     " GPUs per node");
    }
    layout.gpus_per_node = *options.gpus_per_node;
    layout.gpus_per_node_source = "slurm.gpus_per_node" + origin_of(options, "slurm.gpus_per_node");
    return;
  }
  enum class Syntax { kPerNode, kCount, kIndices };  // "gpu:a100:4"; "4"; "0,1,2,3"
  struct Candidate {
    std::string var;
    Syntax syntax;
  };
  std::vector<Candidate> candidates;
  if (options.het_group) {
    const auto group = "_HET_GROUP_" + std::to_string(*options.het_group);
    candidates.push_back({"SLURM_GPUS_PER_NODE" + group, Syntax::kPerNode});
    candidates.push_back({"SLURM_GPUS_ON_NODE" + group, Syntax::kCount});
  }
  const std::size_t own_variables = candidates.size();  // the group's own, with het_group
  candidates.push_back({"SLURM_GPUS_PER_NODE", Syntax::kPerNode});
  candidates.push_back({"SLURM_JOB_GPUS", Syntax::kIndices});
  candidates.push_back({"SLURM_GPUS_ON_NODE", Syntax::kCount});
  std::string names = "slurm.gpus_per_node";
  std::vector<std::string> unset;  // set, but to a value that counts as unset, e.g. "SLURM_GPUS_ON_NODE=0"
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    const auto& c = candidates[i];
    names += ", " + c.var;
    auto value = env(c.var);
    if (value) value = std::string(trimmed(*value));
    if (!value) continue;
    // A job or step without GPUs here (a job without GPUs on this node has an empty
    // SLURM_JOB_GPUS), or a variable a wrapper script exported empty or as 0: the next variable
    // says more.
    if (value->empty() || (c.syntax == Syntax::kCount && *value == "0")) {
      unset.push_back(c.var + "=" + (value->empty() ? "''" : *value));
      continue;
    }
    const auto what = c.var + "=" + quoted(*value);
    if (c.syntax == Syntax::kPerNode) {
      layout.gpus_per_node = parse_gpus_per_node(*value, what);
      layout.gpus_per_node_source = what;
    } else if (c.syntax == Syntax::kIndices) {
      layout.gpus_per_node = count_gpu_indices(*value, what);
      layout.gpus_per_node_source = what;
    } else {
      layout.gpus_per_node = parse_positive_int(*value, what);
      if (layout.gpus_per_node > kMaxGpusPerNode) {
        throw JobError(what + " is more than " + std::to_string(kMaxGpusPerNode) +
                       " GPUs per node (the limit of slurm.gpus_per_node)");
      }
      layout.gpus_per_node_source = c.var + "=" + std::to_string(layout.gpus_per_node);
    }
    if (options.het_group && i >= own_variables) {
      const auto group = std::to_string(*options.het_group);
      layout.warnings.push_back(
          "GPUs per node for heterogeneous group " + group + " taken from " + layout.gpus_per_node_source +
          ", which describes the job's first component: SLURM_GPUS_PER_NODE_HET_GROUP_" + group +
          " is not set (Slurm sets it for --gpus-per-node only); set slurm.gpus_per_node if group " + group +
          "'s nodes differ");
    } else if (c.syntax != Syntax::kPerNode) {
      // --gpus N asks for N in all, which Slurm may spread unevenly (4, 1 and 1 over three
      // nodes): this node's count says nothing of the others'.
      auto total = env(options.het_group ? "SLURM_GPUS_HET_GROUP_" + std::to_string(*options.het_group) : "SLURM_GPUS");
      if (total && !trimmed(*total).empty()) {
        layout.warnings.push_back("GPUs per node taken from " + layout.gpus_per_node_source +
                                  ", which describes this node only, but the job asked for " + quoted(trimmed(*total)) +
                                  " GPUs in all (--gpus), which Slurm may spread unevenly over its nodes; ask for "
                                  "--gpus-per-node, or set slurm.gpus_per_node");
      }
    }
    return;
  }
  layout.gpus_per_node = 8;
  layout.gpus_per_node_defaulted = true;
  layout.gpus_per_node_source = "the default: none of " + names + " is set";
  // "none of ... is set" alone contradicts an environment where one of them is set to nothing.
  if (!unset.empty()) {
    layout.gpus_per_node_source += " (" + unset.front();
    for (std::size_t i = 1; i < unset.size(); ++i) layout.gpus_per_node_source += " and " + unset[i];
    layout.gpus_per_node_source += unset.size() == 1 ? " counts as unset)" : " count as unset)";
  }
  layout.warnings.push_back(layout.gpus_per_node_source + ": assuming " + std::to_string(layout.gpus_per_node) +
                            " GPUs per inference node; set slurm.gpus_per_node if that is wrong");
}

// The job's hosts and, for errors, where each one came from.
struct NodelistHosts {
  std::vector<std::string> hosts;
  std::vector<std::size_t> positions;  // in the hostlist; empty when scontrol expanded it
  std::string nodelist;                // "SOURCE 'LIST'", trimmed and quoted

  std::string where(std::size_t i) const {
    return positions.empty() ? "on line " + std::to_string(i + 1) + " of scontrol's expansion"
                             : "at position " + std::to_string(positions[i]);
  }
};

// Each host name, completed with the suffix and domain, must be one a URL can carry; and no
// host may be listed twice: Slurm never does, and a training host listed again would become an
// inference backend.
void check_hosts(const JobOptions& options, const NodelistHosts& list, std::string_view domain) {
  if (auto problem = host_name_character_problem(options.host_suffix); !problem.empty()) {
    throw JobError(setting(options, "slurm.host_suffix", quoted(options.host_suffix)) + ": " +
                   problem);
  }
  if (auto problem = domain_problem(options.domain); !problem.empty()) {
    throw JobError(setting(options, "slurm.domain", quoted(options.domain)) +
                   " is not a valid domain: " + problem);
  }
  std::map<std::string, std::size_t> seen;  // lower-cased: DNS ignores case
  std::string name;
  for (std::size_t i = 0; i < list.hosts.size(); ++i) {
    const auto& node = list.hosts[i];
    name = node;
    name += options.host_suffix;
    name += domain;
    if (auto problem = host_name_problem(name); !problem.empty()) {
      std::string host = "host " + quoted(name);
      if (name != node) {
        host += " (node " + quoted(node) + " " + list.where(i);
        if (!options.host_suffix.empty())
          host += " + slurm.host_suffix " + quoted(options.host_suffix);
        if (!options.domain.empty()) host += " + slurm.domain " + quoted(options.domain);
        host += ")";
      } else {
        host += " " + list.where(i);
      }
      throw JobError(list.nodelist + ": " + host + " is not a valid host name: " + problem);
    }
    std::string key = node;
    std::transform(key.begin(), key.end(), key.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    auto [it, inserted] = seen.emplace(std::move(key), i);
    if (!inserted) {
      const auto& first = list.hosts[it->second];
      const auto first_where = list.where(it->second);
      const auto again_where = list.where(i);
      const std::string twice =
          first == node
              ? "host " + quoted(node) + " is listed twice (" +
                    (first_where == again_where ? "both " + first_where
                                                : first_where + " and " + again_where) +
                    ")"
              : "hosts " + quoted(first) + " (" + first_where + ") and " + quoted(node) + " (" +
                    again_where + ") are the same host (host names ignore case)";
      throw JobError(
          list.nodelist + ": " + twice +
          "; Slurm never lists a node twice in a job, so this is not the job's nodelist");
    }
  }
}

}  // namespace

EnvLookup process_env() {
  return [](std::string_view name) -> std::optional<std::string> {
    const char* v = std::getenv(std::string(name).c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  };
}

int parse_positive_int(std::string_view text, std::string_view what) {
  const bool digits = !text.empty() && std::all_of(text.begin(), text.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  if (digits && text.find_first_not_of('0') != std::string_view::npos &&
      text.size() - text.find_first_not_of('0') > 9) {
    throw JobError(std::string(what) + " is too large");
  }
  if (text.empty() || text.size() > 18) throw JobError(std::string(what) + " is not a positive integer");
  if (!digits) throw JobError(std::string(what) + " is not a positive integer");
  // At most nine significant digits here: no overflow.
  int value = 0;
  for (char ch : text) value = value * 10 + (ch - '0');
  if (value <= 0) throw JobError(std::string(what) + " is not a positive integer");
  return value;
}

int parse_gpus_per_node(std::string_view text, std::string_view what) {
  const auto bad = [&] {
    return JobError(
        std::string(what) +
        " is not a GPU count (expected N, gpu:N, gpu:TYPE:N, TYPE:N or a comma list of those)");
  };
  long long total = 0;
  std::string_view rest = text;
  for (;;) {
    const auto comma = rest.find(',');
    const auto item = rest.substr(0, comma);
    std::vector<std::string_view> fields;
    for (std::size_t start = 0;;) {
      const auto colon = item.find(':', start);
      fields.push_back(item.substr(start, colon == std::string_view::npos ? colon : colon - start));
      if (colon == std::string_view::npos) break;
      start = colon + 1;
    }
    // "N", "gpu:N" or "TYPE:N", "gpu:TYPE:N": the count is always last.
    const bool shape_ok = fields.size() == 1 || (fields.size() == 2 && !fields[0].empty()) ||
                          (fields.size() == 3 && fields[0] == "gpu" && !fields[1].empty());
    if (!shape_ok || fields.back().empty() ||
        fields.back().find_first_not_of("0123456789") != std::string_view::npos) {
      throw bad();
    }
    // Each count is at most 999,999,999 (parse_positive_int), so the sum cannot overflow
    // before this check.
    total += parse_positive_int(fields.back(), what);
    if (total > kMaxGpusPerNode) {
      throw JobError(std::string(what) + " is more than " + std::to_string(kMaxGpusPerNode) +
                     " GPUs per node (the limit of slurm.gpus_per_node)");
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return static_cast<int>(total);
}

namespace {
// Hosts, counts, checks and servers, once the nodelist is known (see read_job_layout).
void build_layout(const JobOptions& options, const EnvLookup& env, JobLayout& layout, const std::string& het_hint);
}  // namespace

std::optional<JobLayout> read_job_layout(const JobOptions& options, const EnvLookup& env) {
  JobLayout layout;
  if (options.nodelist) {
    layout.nodelist = *options.nodelist;
    layout.nodelist_source = "slurm.nodelist" + origin_of(options, "slurm.nodelist");
  } else if (options.het_group) {
    const auto var = "SLURM_JOB_NODELIST_HET_GROUP_" + std::to_string(*options.het_group);
    auto value = env(var);
    if (!value) {
      throw JobError(setting(options, "slurm.het_group", std::to_string(*options.het_group)) +
                     " but " + var + " is not set (not a heterogeneous job, or no such group)");
    }
    layout.nodelist = *value;
    layout.nodelist_source = var;
  } else if (auto job = env("SLURM_JOB_NODELIST")) {
    layout.nodelist = *job;
    layout.nodelist_source = "SLURM_JOB_NODELIST";
  } else if (auto old = env("SLURM_NODELIST")) {
    layout.nodelist = *old;
    layout.nodelist_source = "SLURM_NODELIST";
  } else {
    return std::nullopt;
  }

  // In a heterogeneous job the plain nodelist is the first component's alone.
  std::string het_hint;
  if (!options.het_group && !options.nodelist) {
    if (auto size = env("SLURM_HET_SIZE")) {
      het_hint = "; this is a heterogeneous job (SLURM_HET_SIZE=" + quoted(trimmed(*size)) + ") and " +
                 layout.nodelist_source +
                 " lists its first component only: set slurm.het_group (INFERGATE_SLURM_HET_GROUP) to the "
                 "component that runs the inference servers";
      layout.warnings.push_back(het_hint.substr(2));
    }
  }

  try {
    build_layout(options, env, layout, het_hint);
  } catch (const JobError& e) {
    // Whatever went wrong with the first component's values (too few GPUs for INFER_TP, no
    // inference host), reading the wrong component is the likelier cause.
    const std::string what = e.what();
    if (het_hint.empty() || what.find(het_hint) != std::string::npos) throw;
    throw JobError(what + het_hint);
  }
  return layout;
}

namespace {

void build_layout(const JobOptions& options, const EnvLookup& env, JobLayout& layout, const std::string& het_hint) {
  NodelistHosts list;
  list.nodelist = layout.nodelist_source + " " + quoted(trimmed(layout.nodelist));
  try {
    list.hosts = expand_hostlist(layout.nodelist, kDefaultMaxHosts, &list.positions);
  } catch (const HostlistError& native) {
    if (!options.use_scontrol) throw JobError(layout.nodelist_source + ": " + native.what());
    try {
      list.hosts = scontrol_hostnames(layout.nodelist, options.scontrol_timeout, kDefaultMaxHosts);
      list.positions.clear();
    } catch (const std::exception& fallback) {
      throw JobError(layout.nodelist_source + ": " + native.what() + "; scontrol fallback: " + fallback.what());
    }
  }
  const auto& hosts = list.hosts;

  // A heterogeneous job's components are its own groups of nodes: trainers in one, inference
  // servers in another, and NUM_TRAINING_NODES counts the job's trainers, not the first hosts of
  // the group read here. Only slurm.training_nodes says this group's first hosts train.
  Resolved training;
  if (options.het_group && !options.training_nodes && !options.nodelist) {
    const auto group = std::to_string(*options.het_group);
    training = {0, "slurm.het_group=" + group + " (every host of the group serves; slurm.training_nodes is not set)",
                false};
    if (auto count = env("NUM_TRAINING_NODES")) {
      layout.warnings.push_back("NUM_TRAINING_NODES=" + quoted(trimmed(*count)) + " is not applied to heterogeneous group " +
                                group + ": every host of " + layout.nodelist_source +
                                " is taken as an inference node (set slurm.training_nodes if its first hosts train)");
    }
  } else {
    training = resolve_int(options, options.training_nodes, "slurm.training_nodes", env, "NUM_TRAINING_NODES", 1,
                           true);
  }
  layout.training_nodes = training.value;
  layout.training_nodes_source = training.source;
  layout.training_nodes_defaulted = training.defaulted;
  const auto tp =
      resolve_int(options, options.infer_tp, "slurm.infer_tp", env, "INFER_TP", 1, false);
  layout.infer_tp = tp.value;
  layout.infer_tp_source = tp.source;
  resolve_gpus_per_node(options, env, layout);

  std::string domain;
  if (!options.domain.empty() && options.domain.front() != '.') domain += '.';
  domain += options.domain;
  check_hosts(options, list, domain);

  if (layout.infer_tp > layout.gpus_per_node) {
    throw JobError(layout.infer_tp_source + " is more than the " + std::to_string(layout.gpus_per_node) +
                   " GPUs per node (from " + layout.gpus_per_node_source +
                   "): a server's tensor-parallel group must fit on one node");
  }
  if (layout.gpus_per_node % layout.infer_tp != 0) {
    throw JobError(layout.infer_tp_source + " does not divide the " +
                   std::to_string(layout.gpus_per_node) + " GPUs per node (from " +
                   layout.gpus_per_node_source + ")");
  }
  if (static_cast<std::size_t>(layout.training_nodes) >= hosts.size()) {
    throw JobError(layout.training_nodes_source + " but the nodelist " +
                   quoted(trimmed(layout.nodelist)) + " has only " + std::to_string(hosts.size()) +
                   " host(s): no host left for inference" + het_hint);
  }
  layout.servers_per_node = layout.gpus_per_node / layout.infer_tp;
  if (options.base_port < 1 || options.base_port + layout.servers_per_node - 1 > 65535) {
    throw JobError(setting(options, "slurm.base_port", std::to_string(options.base_port)) +
                   " with " + std::to_string(layout.servers_per_node) +
                   " servers per node runs past port 65535");
  }
  // Checked before anything is built: both factors are bounded (100,000 hosts, 1,024 GPUs), so
  // the product fits easily in 64 bits.
  const auto inference_nodes = hosts.size() - static_cast<std::size_t>(layout.training_nodes);
  const auto total = static_cast<std::uint64_t>(inference_nodes) *
                     static_cast<std::uint64_t>(layout.servers_per_node);
  if (total > kMaxBackends) {
    throw JobError(
        list.nodelist + ": " + std::to_string(inference_nodes) + " inference host(s) x " +
        std::to_string(layout.servers_per_node) + " server(s) per node = " + std::to_string(total) +
        " inference servers, more than the limit of " + std::to_string(kMaxBackends) +
        "; servers per node = " + std::to_string(layout.gpus_per_node) + " GPUs per node from " +
        layout.gpus_per_node_source + " / " + layout.infer_tp_source);
  }

  const auto split = hosts.begin() + layout.training_nodes;
  layout.training_hosts.assign(hosts.begin(), split);
  layout.inference_hosts.assign(split, hosts.end());
  layout.servers.reserve(static_cast<std::size_t>(total));
  for (const auto& node : layout.inference_hosts) {
    for (int slot = 0; slot < layout.servers_per_node; ++slot) {
      layout.servers.push_back(
          InferenceServer{node + options.host_suffix + domain, node, slot, options.base_port + slot});
    }
  }
  layout.nodelist = std::string(trimmed(layout.nodelist));  // shown in logs and `infergate config`: one line
}

}  // namespace

}  // namespace infergate::slurm
