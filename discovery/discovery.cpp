#include "discovery/discovery.hpp"

#include <cctype>
#include <set>

#include "slurm/hostlist.hpp"
#include "slurm/job.hpp"

namespace infergate::discovery {

BackendInfo backend_from_url(const std::string& url, const std::string& source) {
  std::string problem;
  auto ep = config::parse_backend_url(url, &problem);
  if (!ep) throw DiscoveryError("backend URL " + slurm::quoted_for_message(url) + ": " + problem);
  BackendInfo b;
  b.host = ep->host;
  b.port = ep->port;
  b.id = ep->to_string();
  b.url = "http://" + b.id;
  b.node = ep->host;
  b.slot = 0;
  b.source = source;
  return b;
}

DiscoveryResult discover(const config::Config& config, const config::EnvLookup& env) {
  DiscoveryResult result;
  std::set<std::string> seen;
  std::string how;

  if (config.slurm.enabled) {
    slurm::JobOptions options;
    options.nodelist = config.slurm.nodelist;
    options.training_nodes = config.slurm.training_nodes;
    options.infer_tp = config.slurm.infer_tp;
    options.gpus_per_node = config.slurm.gpus_per_node;
    options.base_port = config.slurm.base_port;
    options.host_suffix = config.slurm.host_suffix;
    options.domain = config.slurm.domain;
    options.het_group = config.slurm.het_group;
    options.use_scontrol = config.slurm.use_scontrol;
    options.scontrol_timeout = config.slurm.scontrol_timeout;
    // Where each slurm.* setting came from, so that a layout error names it.
    for (const auto& [key, source] : config.sources) {
      if (key.rfind("slurm.", 0) != 0) continue;
      if (source == config::Source::kFile) {
        options.origins[key] = config.config_file.empty() ? "the config file" : config.config_file;
      } else if (source == config::Source::kEnv) {
        for (const auto& known : config::known_keys()) {
          if (known.key == key) options.origins[key] = known.env;
        }
      } else if (source == config::Source::kFlag) {
        options.origins[key] = "the command line";
      }
    }
    std::optional<slurm::JobLayout> layout;
    const auto lookup = env ? slurm::EnvLookup(env) : slurm::process_env();
    try {
      layout = slurm::read_job_layout(options, lookup);
    } catch (const std::exception& e) {
      throw DiscoveryError(e.what());
    }
    if (layout) {
      how = "Slurm nodelist '" + layout->nodelist + "' from " + layout->nodelist_source + ": " +
            std::to_string(layout->inference_hosts.size()) + " inference node(s) x " +
            std::to_string(layout->servers_per_node) + " server(s)";
      if (layout->training_nodes_defaulted) {
        result.notes.push_back(layout->training_nodes_source + ": treating the first host (" +
                               layout->training_hosts.front() + ") as the only training node");
      }
      result.warnings = layout->warnings;
      result.notes.push_back(how + " (" + layout->infer_tp_source + ", " + std::to_string(layout->gpus_per_node) +
                             " GPUs per node from " + layout->gpus_per_node_source + ")");
      result.slurm = {
          {"nodelist", layout->nodelist, layout->nodelist_source},
          {"training_nodes", std::to_string(layout->training_nodes), layout->training_nodes_source},
          {"infer_tp", std::to_string(layout->infer_tp), layout->infer_tp_source},
          {"gpus_per_node", std::to_string(layout->gpus_per_node), layout->gpus_per_node_source},
          {"backends", std::to_string(layout->servers.size()),
           std::to_string(layout->inference_hosts.size()) + " inference node(s) x " +
               std::to_string(layout->servers_per_node) + " (gpus_per_node / infer_tp)"},
      };
      for (const auto& server : layout->servers) {
        BackendInfo b;
        // In lower case, as a URL's host is (config::parse_backend_url): GPU01 from the nodelist and
        // http://gpu01:9000 from --backend or the admin API are one server, one backend.
        b.host = server.host;
        for (auto& ch : b.host) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        b.port = static_cast<std::uint16_t>(server.port);
        b.id = b.host + ":" + std::to_string(server.port);
        b.url = "http://" + b.id;
        b.node = server.node;
        b.slot = server.slot;
        b.source = "slurm";
        if (seen.insert(b.id).second) result.backends.push_back(std::move(b));
      }
    } else {
      how = "no Slurm nodelist (SLURM_JOB_NODELIST unset)";
      // salloc with components (`salloc ... : ...`) sets no plain nodelist at all.
      if (auto size = lookup("SLURM_HET_SIZE")) {
        how += "; this is a heterogeneous job (SLURM_HET_SIZE=" + std::string(*size) +
               "): set slurm.het_group (INFERGATE_SLURM_HET_GROUP) to the component that runs the inference servers";
      }
    }
  } else {
    // Said the way it was set: the flag, or the key from the environment or the file.
    const auto it = config.sources.find("slurm.enabled");
    const auto source = it == config.sources.end() ? config::Source::kDefault : it->second;
    how = source == config::Source::kEnv    ? "Slurm discovery disabled (INFERGATE_SLURM_ENABLED)"
          : source == config::Source::kFile ? "Slurm discovery disabled (slurm.enabled in " +
                                                  (config.config_file.empty() ? std::string("the config file")
                                                                              : config.config_file) + ")"
                                            : "Slurm discovery disabled (--no-slurm)";
  }

  for (const auto& url : config.backends) {
    auto b = backend_from_url(url, "static");
    if (seen.insert(b.id).second) result.backends.push_back(std::move(b));
  }
  how += "; " + std::to_string(config.backends.size()) + " static backend(s)";
  result.how = how;
  return result;
}

}  // namespace infergate::discovery
