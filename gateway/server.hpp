// The serving gateway: N worker threads, each with its own io_context and SO_REUSEPORT
// acceptor, plus a control thread for signals and graceful shutdown.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "config/config.hpp"
#include "discovery/discovery.hpp"

namespace infergate::gateway {

// The effective limits.max_client_connections. Every proxied request holds two descriptors
// (client and backend), so the automatic limit (configured == 0) is half of what the open-file
// limit leaves after a reserve for listeners, logs and the health probes (two per backend).
// A client the gateway cannot pair with a backend connection would only get an error; past
// the limit it waits in the listen backlog instead and is served when a connection closes.
std::int64_t client_connection_limit(int configured, std::uint64_t open_file_limit, std::size_t backends);

// The effective limits.max_body_memory: `configured`, or (0) a quarter of the memory the gateway
// may use, `physical` or its cgroup's `cgroup_limit` if lower (a Slurm job's memory limit is
// what the kernel enforces), and never below `max_body`: the largest body accepted must fit.
std::uint64_t body_memory_limit(std::uint64_t configured, std::uint64_t max_body, std::uint64_t physical,
                                std::optional<std::uint64_t> cgroup_limit);

// The memory limit of the cgroup a process is in, if any: `self_cgroup` is the text of
// /proc/self/cgroup and `root` where cgroups are mounted (/sys/fs/cgroup): the lowest limit
// from the process's group up to the mount's top (memory.max for cgroup v2, the memory
// controller's memory.limit_in_bytes for v1).
std::optional<std::uint64_t> cgroup_memory_limit(const std::string& self_cgroup, const std::string& root);

class Server {
 public:
  Server(config::Config config, discovery::DiscoveryResult discovered);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the listening sockets; throws std::runtime_error naming the address on failure.
  void bind();
  std::uint16_t port() const;
  // The address `listen` resolved to (the same text when it is already an address).
  std::string address() const;
  std::uint16_t metrics_port() const;  // 0 unless metrics.listen is set
  // Serves until SIGINT/SIGTERM, then lets in-flight requests finish (timeouts.shutdown);
  // returns the process exit code.
  int run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace infergate::gateway
