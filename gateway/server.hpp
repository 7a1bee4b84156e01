// The serving gateway: N worker threads, each with its own io_context and SO_REUSEPORT
// acceptor, plus a control thread for signals and graceful shutdown.
#pragma once

#include <cstdint>
#include <memory>

#include "config/config.hpp"
#include "discovery/discovery.hpp"

namespace infergate::gateway {

class Server {
 public:
  Server(config::Config config, discovery::DiscoveryResult discovered);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the listening sockets; throws std::runtime_error naming the address on failure.
  void bind();
  std::uint16_t port() const;
  std::uint16_t metrics_port() const;  // 0 unless metrics.listen is set
  // Serves until SIGINT/SIGTERM, then lets in-flight requests finish (timeouts.shutdown);
  // returns the process exit code.
  int run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace infergate::gateway
