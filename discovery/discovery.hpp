// Builds the backend set from its sources: the Slurm job's layout and static URLs.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "config/config.hpp"

namespace infergate::discovery {

struct BackendInfo {
  std::string id;   // host:port
  std::string url;  // http://host:port
  std::string host;
  std::uint16_t port = 0;
  std::string node;    // Slurm node name, or the host for static backends
  int slot = 0;        // port index on the node
  std::string source;  // slurm, static, admin
};

class DiscoveryError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One setting of the Slurm layout as the job resolved it, e.g. {"training_nodes", "2",
// "NUM_TRAINING_NODES=2"}: what `infergate config` shows next to the slurm.* keys, which stay
// null when the job's environment gives the value.
struct ResolvedSetting {
  std::string name;
  std::string value;
  std::string source;
};

struct DiscoveryResult {
  std::vector<BackendInfo> backends;  // union of the sources, duplicates removed, stable order
  std::string how;                    // one line: how discovery was tried (for 503 messages)
  std::vector<std::string> notes;     // things worth logging (defaults applied, ...)
  std::vector<std::string> warnings;  // guesses that may be wrong for this job (slurm::JobLayout::warnings)
  std::vector<ResolvedSetting> slurm;  // empty unless a Slurm nodelist was found
};

// Throws DiscoveryError with a one-line message on bad input (nodelist, env, URLs).
DiscoveryResult discover(const config::Config& config, const config::EnvLookup& env);

// Parses "http://host:port" (config::parse_backend_url) into a BackendInfo with the given
// source. Throws DiscoveryError naming the URL and the problem.
BackendInfo backend_from_url(const std::string& url, const std::string& source);

}  // namespace infergate::discovery
