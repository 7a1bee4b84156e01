#include "slurm/job.hpp"

#include <cstdlib>

#include "slurm/hostlist.hpp"

namespace infergate::slurm {
namespace {

std::string quoted(std::string_view s) {
  std::string out;  // appended piecewise: GCC 12 warns falsely (-Wrestrict) on "'" + s + "'"
  out.reserve(s.size() + 2);
  out += '\'';
  out += s;
  out += '\'';
  return out;
}

// A value from the options, else from the environment variable, else the default.
int resolve_int(const std::optional<int>& option, std::string_view option_key, const EnvLookup& env,
                std::string_view var, int fallback, bool allow_zero, bool* defaulted) {
  if (option) {
    if (*option < (allow_zero ? 0 : 1)) {
      throw JobError(std::string(option_key) + "=" + std::to_string(*option) + " must be " +
                     (allow_zero ? "zero or more" : "a positive integer"));
    }
    return *option;
  }
  auto value = env(var);
  if (!value) {
    if (defaulted) *defaulted = true;
    return fallback;
  }
  if (allow_zero && *value == "0") return 0;
  return parse_positive_int(*value, std::string(var) + "=" + quoted(*value));
}

// GPUs per inference node. SLURM_GPUS_ON_NODE describes the node the gateway itself runs on,
// which may be a CPU or training node, so the job-wide SLURM_GPUS_PER_NODE (set by
// --gpus-per-node) comes first.
void resolve_gpus_per_node(const JobOptions& options, const EnvLookup& env, JobLayout& layout) {
  if (options.gpus_per_node) {
    if (*options.gpus_per_node < 1) {
      throw JobError("slurm.gpus_per_node=" + std::to_string(*options.gpus_per_node) +
                     " must be a positive integer");
    }
    layout.gpus_per_node = *options.gpus_per_node;
    layout.gpus_per_node_source = "slurm.gpus_per_node";
  } else if (auto per_node = env("SLURM_GPUS_PER_NODE")) {
    layout.gpus_per_node =
        parse_gpus_per_node(*per_node, "SLURM_GPUS_PER_NODE=" + quoted(*per_node));
    layout.gpus_per_node_source = "SLURM_GPUS_PER_NODE=" + quoted(*per_node);
  } else {
    layout.gpus_per_node =
        resolve_int(std::nullopt, "slurm.gpus_per_node", env, "SLURM_GPUS_ON_NODE", 8, false,
                    &layout.gpus_per_node_defaulted);
    layout.gpus_per_node_source =
        layout.gpus_per_node_defaulted
            ? "the default: none of slurm.gpus_per_node, SLURM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE "
              "is set"
            : "SLURM_GPUS_ON_NODE=" + std::to_string(layout.gpus_per_node);
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
  if (text.empty() || text.size() > 9) throw JobError(std::string(what) + " is not a positive integer");
  int value = 0;
  for (char ch : text) {
    if (ch < '0' || ch > '9') throw JobError(std::string(what) + " is not a positive integer");
    value = value * 10 + (ch - '0');
  }
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
    total += parse_positive_int(fields.back(), what);
    if (total > 999'999'999) throw JobError(std::string(what) + " is too large");
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return static_cast<int>(total);
}

std::optional<JobLayout> read_job_layout(const JobOptions& options, const EnvLookup& env) {
  JobLayout layout;
  if (options.nodelist) {
    layout.nodelist = *options.nodelist;
    layout.nodelist_source = "slurm.nodelist";
  } else if (options.het_group) {
    const auto var = "SLURM_JOB_NODELIST_HET_GROUP_" + std::to_string(*options.het_group);
    auto value = env(var);
    if (!value) {
      throw JobError("slurm.het_group=" + std::to_string(*options.het_group) + " but " + var +
                     " is not set (not a heterogeneous job, or no such group)");
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

  std::vector<std::string> hosts;
  try {
    hosts = expand_hostlist(layout.nodelist);
  } catch (const HostlistError& native) {
    if (!options.use_scontrol) throw JobError(layout.nodelist_source + ": " + native.what());
    try {
      hosts = scontrol_hostnames(layout.nodelist, options.scontrol_timeout);
    } catch (const std::exception& fallback) {
      throw JobError(layout.nodelist_source + ": " + native.what() + "; scontrol fallback: " + fallback.what());
    }
  }

  layout.training_nodes = resolve_int(options.training_nodes, "slurm.training_nodes", env,
                                      "NUM_TRAINING_NODES", 1, true, &layout.training_nodes_defaulted);
  layout.infer_tp = resolve_int(options.infer_tp, "slurm.infer_tp", env, "INFER_TP", 1, false, nullptr);
  resolve_gpus_per_node(options, env, layout);
  if (layout.gpus_per_node % layout.infer_tp != 0) {
    throw JobError("INFER_TP=" + std::to_string(layout.infer_tp) + " does not divide the " +
                   std::to_string(layout.gpus_per_node) + " GPUs per node (from " +
                   layout.gpus_per_node_source + ")");
  }
  if (static_cast<std::size_t>(layout.training_nodes) >= hosts.size()) {
    throw JobError("NUM_TRAINING_NODES=" + std::to_string(layout.training_nodes) + " but the nodelist " +
                   quoted(layout.nodelist) + " has only " + std::to_string(hosts.size()) +
                   " host(s): no host left for inference");
  }
  layout.servers_per_node = layout.gpus_per_node / layout.infer_tp;
  if (options.base_port < 1 || options.base_port + layout.servers_per_node - 1 > 65535) {
    throw JobError("slurm.base_port=" + std::to_string(options.base_port) + " with " +
                   std::to_string(layout.servers_per_node) + " servers per node runs past port 65535");
  }

  std::string domain;
  if (!options.domain.empty() && options.domain.front() != '.') domain += '.';
  domain += options.domain;
  const auto split = hosts.begin() + layout.training_nodes;
  layout.training_hosts.assign(hosts.begin(), split);
  layout.inference_hosts.assign(split, hosts.end());
  for (const auto& node : layout.inference_hosts) {
    for (int slot = 0; slot < layout.servers_per_node; ++slot) {
      layout.servers.push_back(
          InferenceServer{node + options.host_suffix + domain, node, slot, options.base_port + slot});
    }
  }
  return layout;
}

}  // namespace infergate::slurm
