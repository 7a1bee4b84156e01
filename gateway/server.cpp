#include "gateway/server.hpp"

#include <spdlog/spdlog.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "config/units.hpp"
#include "discovery/health_checker.hpp"
#include "gateway/gateway_state.hpp"
#include "gateway/net.hpp"
#include "gateway/session.hpp"
#include "gateway/worker.hpp"

namespace infergate::gateway {
namespace {

constexpr auto kTuple = net::as_tuple(net::use_awaitable);

// Checked this often while the gateway holds limits.max_client_connections: a closed
// connection's place is taken within this long, at no cost while below the limit.
constexpr auto kConnectionRoomPoll = std::chrono::milliseconds(5);
constexpr auto kLimitWarningEvery = std::chrono::seconds(10);
// After timeouts.shutdown: how long the 503s to requests still waiting have to go out.
constexpr auto kShutdownAnswerGrace = std::chrono::seconds(1);
// A SIGTERM this soon after the first SIGTERM is the same request to stop (see on_signal).
constexpr auto kRepeatedSigterm = std::chrono::seconds(1);

// The signals that stop the gateway (SIGHUP too: see run()), read from a signalfd.
sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int signo : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, signo);
  return set;
}

constexpr std::size_t kReclaimAtLimit = 16;
constexpr int kReclaimEveryPolls = 20;  // 100 ms
constexpr auto kReclaimMinIdle = std::chrono::milliseconds(500);  // a client that just connected is about to send

// Takes a connection slot, waiting while none is free (or until shutdown: then it holds none).
// Clients that arrive meanwhile wait in the listen backlog, with nothing lost.
net::awaitable<ConnectionSlot> take_connection_slot(Worker* w, std::chrono::steady_clock::time_point* last_warning) {
  auto& state = *w->state;
  auto slot = ConnectionSlot::try_take(state.connection_slots, state.max_client_connections);
  if (slot) co_return slot;
  // Idle keep-alive connections (and silent new ones) make room, a few at a time, as nginx
  // does: a client waiting for its first answer matters more than one that may send again.
  if (state.reclaim_idle_connections) state.reclaim_idle_connections();
  const auto now = std::chrono::steady_clock::now();
  if (now - *last_warning >= kLimitWarningEvery) {
    *last_warning = now;
    spdlog::warn("all {} client connection slots are taken (limits.max_client_connections): idle connections "
                 "are closed to make room; new clients wait in the listen backlog until a connection closes",
                 state.max_client_connections);
  }
  net::steady_timer pause(w->io);
  for (int polls = 1; !slot && !state.stopping.load(std::memory_order_relaxed); ++polls) {
    pause.expires_after(kConnectionRoomPoll);
    co_await pause.async_wait(kTuple);
    slot = ConnectionSlot::try_take(state.connection_slots, state.max_client_connections);
    // Connections busy a moment ago may be idle now: look again now and then.
    if (!slot && polls % kReclaimEveryPolls == 0 && state.reclaim_idle_connections) state.reclaim_idle_connections();
  }
  co_return slot;
}

net::awaitable<void> accept_loop(Worker* w, tcp::acceptor* acceptor, Listener listener) {
  std::chrono::steady_clock::time_point last_warning{};
  beast::error_code ec;
  acceptor->non_blocking(true, ec);
  for (;;) {
    // Each worker has its own SO_REUSEPORT queue, so a slot is taken only once this worker has
    // a client waiting: a worker idle in accept must not sit on a slot that another worker's
    // queued client needs.
    auto [wait_ec] = co_await acceptor->async_wait(tcp::acceptor::wait_read, kTuple);
    if (w->state->stopping.load() || !acceptor->is_open()) co_return;
    // The clients queued by now are taken in this turn (a trainer opens hundreds at once), up
    // to a batch, so that a flood of connections cannot keep open streams waiting; each session
    // runs up to its first wait before the next is accepted.
    constexpr int kAcceptBatch = 64;
    for (int taken = 0; !wait_ec && taken < kAcceptBatch; ++taken) {
      const bool first = taken == 0;
      // The metrics listener is never held back: operators must see a saturated gateway.
      ConnectionSlot slot;
      if (listener == Listener::kGateway) {
        if (first) {
          slot = co_await take_connection_slot(w, &last_warning);
        } else {
          // Past the first client the queue may be empty: wait for room only once it is known
          // not to be (the next turn), so this worker holds no slot another one's client needs.
          slot = ConnectionSlot::try_take(w->state->connection_slots, w->state->max_client_connections);
          if (!slot) break;
        }
      }
      if (w->state->stopping.load() || !acceptor->is_open()) co_return;
      tcp::socket socket(w->io);
      acceptor->accept(socket, ec);
      if (ec == net::error::would_block || ec == net::error::try_again) break;  // the queue is empty
      if (ec == net::error::connection_aborted) continue;                      // the client took it back
      if (ec) {
        wait_ec = ec;
        break;
      }
      try {
        net::co_spawn(w->io, run_client_session(w, std::move(socket), listener, std::move(slot)), net::detached);
      } catch (const std::exception& e) {  // out of memory: this client is dropped, the listener stays
        spdlog::error("could not start a client session: {}", e.what());
      }
    }
    if (wait_ec) {
      // Out of descriptors or a transient error: keep listening, a moment later.
      spdlog::warn("accept failed: {}; retrying", wait_ec.message());
      net::steady_timer pause(w->io, std::chrono::milliseconds(50));
      co_await pause.async_wait(kTuple);
    }
  }
}

// Closes idle pooled upstream connections past their idle timeout, and those to removed
// backends; run about once a second by the worker's deadline sweep.
void evict_pooled(Worker* w, std::chrono::steady_clock::time_point now) {
  std::vector<bool> present;  // by backend index: still in the registry
  // Held for the walk: a range-for keeps no temporary of its range expression alive
  // (before C++23), and the health checker's next publish would free the list under it.
  const auto set = w->state->registry.snapshot();
  for (const auto& b : set->all) {
    if (b->index() >= present.size()) present.resize(b->index() + 1, false);
    present[b->index()] = true;
  }
  w->pool.evict_expired(now, present);
}

}  // namespace

std::int64_t client_connection_limit(int configured, std::uint64_t open_file_limit, std::size_t backends) {
  if (configured > 0) return configured;
  constexpr std::uint64_t kReserve = 64;  // listeners, epoll, eventfds, logs, resolver
  const std::uint64_t reserved = kReserve + 2 * static_cast<std::uint64_t>(backends);
  if (open_file_limit <= reserved + 2) return 1;
  return static_cast<std::int64_t>(std::min<std::uint64_t>((open_file_limit - reserved) / 2, 1ULL << 40));
}

std::uint64_t body_memory_limit(std::uint64_t configured, std::uint64_t max_body, std::uint64_t physical,
                                std::optional<std::uint64_t> cgroup_limit) {
  if (configured > 0) return configured;
  const auto usable = cgroup_limit ? std::min(physical, *cgroup_limit) : physical;
  return std::max(usable / 4, max_body);
}

namespace {

std::optional<std::uint64_t> read_limit_file(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text.empty() || text.find_first_not_of("0123456789") != std::string::npos) {
    return std::nullopt;  // absent, unreadable, or "max"
  }
  const auto v = std::strtoull(text.c_str(), nullptr, 10);
  if (v >= (std::uint64_t{1} << 62)) return std::nullopt;  // cgroup v1 says "no limit" so
  return v;
}

}  // namespace

std::optional<std::uint64_t> cgroup_memory_limit(const std::string& self_cgroup, const std::string& root) {
  std::optional<std::uint64_t> lowest;
  auto take = [&lowest](std::optional<std::uint64_t> v) {
    if (v && (!lowest || *v < *lowest)) lowest = v;
  };
  std::istringstream lines(self_cgroup);
  for (std::string line; std::getline(lines, line);) {
    // hierarchy-ID:controllers:path
    const auto first = line.find(':');
    const auto second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    const auto controllers = line.substr(first + 1, second - first - 1);
    std::string path = line.substr(second + 1);
    // The group's own file and every parent's up to the mount's top: a limit is often set on a
    // parent (a Slurm job's, above its step's group), and a container sees its own group at the
    // top of the mount whatever path the file names.
    std::string dir;
    std::string file;
    if (line.compare(0, first, "0") == 0 && controllers.empty()) {
      dir = root;  // v2
      file = "memory.max";
    } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {
      dir = root + "/memory";  // v1
      file = "memory.limit_in_bytes";
    } else {
      continue;
    }
    for (;;) {
      take(read_limit_file(dir + path + (path.ends_with('/') ? "" : "/") + file));
      if (path.empty() || path == "/") break;
      path.erase(path.rfind('/'));
    }
  }
  return lowest;
}

struct Server::Impl {
  Impl(config::Config config, discovery::DiscoveryResult discovered)
      : state(std::move(config), std::move(discovered.how)), health(state.config, state.registry) {
    const auto backend_count = discovered.backends.size();
    for (auto& b : discovered.backends) state.registry.add(std::move(b));
    state.health = &health;
    rlimit files{};
    const std::uint64_t open_files = getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY
                                         ? static_cast<std::uint64_t>(files.rlim_cur)
                                         : std::uint64_t{1} << 20;
    state.max_client_connections =
        client_connection_limit(state.config.limits.max_client_connections, open_files, backend_count);
    spdlog::info("holding up to {} client connections at once (limits.max_client_connections{}; open-file limit {})",
                 state.max_client_connections, state.config.limits.max_client_connections == 0 ? ": automatic" : "",
                 open_files);
    // Each proxied request takes a descriptor for its client and one for its backend: a limit
    // past what the open-file limit allows runs out of descriptors instead of queueing clients.
    const auto automatic = client_connection_limit(0, open_files, backend_count);
    if (state.max_client_connections > automatic) {
      spdlog::warn("limits.max_client_connections ({}) is more than the open-file limit ({}) allows for proxied "
                   "requests (about {}); the gateway may run out of descriptors (raise `ulimit -n`, or set 0 for the "
                   "automatic limit)",
                   state.max_client_connections, open_files, automatic);
    }
    const auto min_healthy = static_cast<std::size_t>(state.config.health.min_healthy_backends);
    if (backend_count > 0 && min_healthy > backend_count) {
      spdlog::warn("health.min_healthy_backends is {} but only {} backend(s) were found: /ready stays 503 until more "
                   "are added",
                   min_healthy, backend_count);
    }
    const auto pages = sysconf(_SC_PHYS_PAGES);
    const auto page_size = sysconf(_SC_PAGE_SIZE);
    const std::uint64_t physical = pages > 0 && page_size > 0 ? static_cast<std::uint64_t>(pages) *
                                                                    static_cast<std::uint64_t>(page_size)
                                                              : std::uint64_t{1} << 40;
    std::ifstream self("/proc/self/cgroup");
    const std::string self_cgroup((std::istreambuf_iterator<char>(self)), std::istreambuf_iterator<char>());
    const auto cgroup = cgroup_memory_limit(self_cgroup, "/sys/fs/cgroup");
    state.max_body_memory =
        body_memory_limit(state.config.limits.max_body_memory, state.config.limits.max_body, physical, cgroup);
    // Exact sizes, as the config and the 503 answer write them: whole MiB would print a limit
    // under 1 MiB as 0 and round the automatic one away from the memory it is a quarter of. A
    // size in no whole unit gets "bytes", and a large one its size in MiB beside it.
    const auto size = [](std::uint64_t bytes) {
      auto text = config::format_size(bytes);
      if (text.find_first_not_of("0123456789") == std::string::npos) text += " bytes";
      if (bytes >= (std::uint64_t{1} << 20) && bytes % (std::uint64_t{1} << 20) != 0) {
        text += " (" + std::to_string(bytes >> 20) + " MiB)";
      }
      return text;
    };
    spdlog::info("holding up to {} of request bodies at once (limits.max_body_memory{}; memory {}, cgroup limit {})",
                 size(state.max_body_memory), state.config.limits.max_body_memory == 0 ? ": automatic" : "",
                 size(physical), cgroup ? size(*cgroup) : std::string("none"));
    const int n = state.config.effective_threads();
    for (int i = 0; i < n; ++i) {
      workers.push_back(std::make_unique<Worker>(state, static_cast<std::size_t>(i)));
    }
    // Each worker walks its own connections, on its own thread.
    state.reclaim_idle_connections = [this] {
      for (auto& w : workers) {
        Worker* worker = w.get();
        net::post(worker->io,
                  [worker] { worker->deadlines.end_waits_between_requests(kReclaimAtLimit, kReclaimMinIdle); });
      }
    };
  }

  GatewayState state;
  discovery::HealthChecker health;
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::unique_ptr<tcp::acceptor>> acceptors;  // acceptors[i] runs on workers[i]
  std::unique_ptr<tcp::acceptor> metrics_acceptor;        // metrics.listen, on worker 0
  std::uint16_t bound_port = 0;
  net::ip::address bound_address;
  std::uint16_t metrics_port = 0;
};

Server::Server(config::Config config, discovery::DiscoveryResult discovered)
    : impl_(std::make_unique<Impl>(std::move(config), std::move(discovered))) {}

Server::~Server() = default;

namespace {
net::ip::address resolve_listen_address(net::io_context& io, const config::Endpoint& listen, const char* key) {
  beast::error_code ec;
  auto address = net::ip::make_address(listen.host, ec);
  if (!ec) return address;
  // A host name: resolve it once.
  tcp::resolver resolver(io);
  auto results = resolver.resolve(listen.host, std::to_string(listen.port), ec);
  if (ec || results.empty()) {
    throw std::runtime_error(std::string(key) + ": cannot resolve '" + listen.host + "': " + ec.message());
  }
  return results.begin()->endpoint().address();
}
// The listening TCP sockets of one address family in this network namespace, asked of the
// kernel over sock_diag netlink (reading /proc/net/tcp instead lists every connection: 70 ms at
// start-up on a node with 18,000 sockets). Each is its address (4 or 16 bytes) and port.
struct ListeningSocket {
  std::array<unsigned char, 16> address{};
  std::uint16_t port = 0;
};
std::optional<std::vector<ListeningSocket>> listening_sockets(int family) {
  const int fd = ::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  if (fd < 0) return std::nullopt;
  struct Request {
    nlmsghdr header;
    inet_diag_req_v2 request;
  } message{};
  message.header.nlmsg_len = sizeof message;
  message.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  message.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  message.request.sdiag_family = static_cast<std::uint8_t>(family);
  message.request.sdiag_protocol = IPPROTO_TCP;
  message.request.idiag_states = 1U << TCP_LISTEN;
  std::optional<std::vector<ListeningSocket>> result;
  if (::send(fd, &message, sizeof message, 0) == static_cast<ssize_t>(sizeof message)) {
    std::vector<char> buffer(64 * 1024);
    std::vector<ListeningSocket> found;
    for (bool done = false; !done;) {
      const auto n = ::recv(fd, buffer.data(), buffer.size(), 0);
      if (n <= 0) break;
      auto left = static_cast<int>(n);
      for (auto* h = reinterpret_cast<nlmsghdr*>(buffer.data()); NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
        if (h->nlmsg_type == NLMSG_DONE) {
          result = std::move(found);
          done = true;
          break;
        }
        if (h->nlmsg_type == NLMSG_ERROR) {
          done = true;
          break;
        }
        const auto* d = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
        ListeningSocket l;
        std::memcpy(l.address.data(), d->id.idiag_src, family == AF_INET ? 4 : 16);
        l.port = ntohs(d->id.idiag_sport);
        found.push_back(l);
      }
    }
  }
  ::close(fd);
  return result;
}

// Whether another socket listens where clients of `endpoint` could reach it instead: the same
// port on the same address, or where either address is a wildcard (the kernel prefers the more
// specific one, or a wildcard IPv6 socket takes IPv4 clients too). Called before our own sockets
// listen, so every one found is someone else's. Nothing when the kernel cannot be asked.
std::optional<std::string> other_listener(const tcp::endpoint& endpoint) {
  const bool v4 = endpoint.address().is_v4();
  std::array<unsigned char, 16> ours{};
  if (v4) {
    const auto b = endpoint.address().to_v4().to_bytes();
    std::copy(b.begin(), b.end(), ours.begin());
  } else {
    ours = endpoint.address().to_v6().to_bytes();
  }
  const std::array<unsigned char, 16> any{};
  const bool ours_wildcard = ours == any;
  for (const int family : {AF_INET, AF_INET6}) {
    const auto listeners = listening_sockets(family);
    if (!listeners) return std::nullopt;
    const bool same_family = (family == AF_INET) == v4;
    for (const auto& l : *listeners) {
      if (l.port != endpoint.port()) continue;
      const bool theirs_wildcard = l.address == any;
      const bool overlaps = same_family ? (l.address == ours || ours_wildcard || theirs_wildcard)
                                        : ((ours_wildcard && !v4) || (theirs_wildcard && family == AF_INET6));
      if (!overlaps) continue;
      if (family == AF_INET) {
        return net::ip::address_v4(std::array<unsigned char, 4>{l.address[0], l.address[1], l.address[2], l.address[3]})
                   .to_string() + ":" + std::to_string(l.port);
      }
      return "[" + net::ip::address_v6(l.address).to_string() + "]:" + std::to_string(l.port);
    }
  }
  return std::string();
}

}  // namespace

void Server::bind() {
  const auto& listen = impl_->state.config.listen;
  beast::error_code ec;
  auto address = resolve_listen_address(impl_->workers.front()->io, listen, "listen");
  const auto& metrics = impl_->state.config.metrics_listen;
  std::optional<tcp::endpoint> metrics_endpoint;
  if (metrics) {
    metrics_endpoint.emplace(resolve_listen_address(impl_->workers.front()->io, *metrics, "metrics.listen"),
                             metrics->port);
  }
  // From here the gateway can be reached, and a script that sees it listening may stop it at
  // once. The stop signals are blocked from now on, on this thread and so on every thread
  // started from it: one that comes waits, pending, until run() reads it from a signalfd, and
  // none can end the process by its default action (exit code 143, a failed step to Slurm),
  // not even while it exits. Not before the name lookups above, which a stop must be able to
  // cut short.
  const sigset_t stop = stop_signals();
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  std::uint16_t port = listen.port;
  for (auto& w : impl_->workers) {
    auto acceptor = std::make_unique<tcp::acceptor>(w->io);
    tcp::endpoint endpoint(address, port);
    acceptor->open(endpoint.protocol(), ec);
    if (!ec) acceptor->set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) {
      // Every worker accepts on its own socket; the kernel spreads connections across them.
      int one = 1;
      if (::setsockopt(acceptor->native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
        ec.assign(errno, boost::system::system_category());
      }
    }
    if (!ec) acceptor->bind(endpoint, ec);
    if (ec) {
      throw std::runtime_error("listen: cannot listen on " + listen.to_string() + ": " + ec.message());
    }
    // Port 0: the first bind picks the port; the other workers share it.
    port = acceptor->local_endpoint().port();
    impl_->acceptors.push_back(std::move(acceptor));
  }
  impl_->bound_port = port;
  impl_->bound_address = address;
  // SO_REUSEPORT lets any process of the same user bind the port too, and once both listen the
  // kernel splits (or, for a more specific address, takes all) the clients' connections: a
  // trainer would reach another job's inference servers. Our sockets are bound but not yet
  // listening (a socket joins the port's group when it listens), so any listener found now is
  // someone else's, and no client connection has come to us meanwhile.
  if (const auto other = other_listener(tcp::endpoint(address, port)); other && !other->empty()) {
    impl_->acceptors.clear();
    throw std::runtime_error("listen: cannot listen on " + listen.to_string() + ": another process already listens on " +
                             *other + " (with SO_REUSEPORT, so the kernel would share this port's connections "
                             "between the two); stop it or choose another port");
  }
  for (auto& acceptor : impl_->acceptors) {
    acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec) throw std::runtime_error("listen: cannot listen on " + listen.to_string() + ": " + ec.message());
  }

  if (metrics_endpoint) {
    const auto& endpoint = *metrics_endpoint;
    auto acceptor = std::make_unique<tcp::acceptor>(impl_->workers.front()->io);
    acceptor->open(endpoint.protocol(), ec);
    if (!ec) acceptor->set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) acceptor->bind(endpoint, ec);
    if (!ec) acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec) {
      throw std::runtime_error("metrics.listen: cannot listen on " + metrics->to_string() + ": " + ec.message());
    }
    impl_->metrics_port = acceptor->local_endpoint().port();
    impl_->metrics_acceptor = std::move(acceptor);
  }
}

std::uint16_t Server::metrics_port() const { return impl_->metrics_port; }

std::uint16_t Server::port() const { return impl_->bound_port; }

std::string Server::address() const { return impl_->bound_address.to_string(); }

int Server::run() {
  auto& state = impl_->state;
  if (impl_->acceptors.empty()) bind();
  impl_->health.start();
  for (std::size_t i = 0; i < impl_->workers.size(); ++i) {
    Worker* w = impl_->workers[i].get();
    net::co_spawn(w->io, accept_loop(w, impl_->acceptors[i].get(), Listener::kGateway), net::detached);
    // Also while draining: in-flight requests keep their timeouts.
    net::co_spawn(w->io,
                  sweep_forever(w->deadlines, "worker " + std::to_string(w->index),
                                [w](std::chrono::steady_clock::time_point now) { evict_pooled(w, now); }),
                  net::detached);
  }
  if (impl_->metrics_acceptor) {
    Worker* w = impl_->workers.front().get();
    net::co_spawn(w->io, accept_loop(w, impl_->metrics_acceptor.get(), Listener::kMetricsOnly), net::detached);
  }

  net::io_context control;
  // The stop signals, blocked since bind(), read as they come (see bind()). SIGHUP too: by
  // default it would end the process and every stream with it, which a lost terminal (an
  // `srun --pty` session) must not do. Reloading on it is not built yet.
  const sigset_t stop = stop_signals();
  const int signal_descriptor = ::signalfd(-1, &stop, SFD_NONBLOCK | SFD_CLOEXEC);
  if (signal_descriptor < 0) throw std::runtime_error(std::string("cannot read signals: signalfd: ") + std::strerror(errno));
  net::posix::stream_descriptor signals(control, signal_descriptor);
  signalfd_siginfo signal_info{};
  net::steady_timer drain_timer(control);
  std::atomic<bool> drain_started{false};
  std::chrono::steady_clock::time_point drain_deadline;
  // Workers that have closed their listeners and ended their idle waits: until all have, a
  // request whose bytes already came may not be counted anywhere yet.
  std::atomic<std::size_t> workers_told{0};
  bool idle_once = false;  // the previous check saw nothing in flight

  auto stop_workers = [this] {
    for (auto& w : impl_->workers) w->io.stop();
  };
  // Polls the in-flight count until it reaches zero or the deadline passes.
  std::function<void()> check_drained;
  bool exiting = false;  // a second signal: the drain's checks end too
  check_drained = [&] {
    // The drain timer's cancel below misses a wait that had just ended (its handler queued):
    // without this, the check would go on every 10 ms until timeouts.shutdown.
    if (exiting) return;
    // A request still arriving counts too: it is read and answered (with `Connection: close`).
    auto arriving = state.arriving_requests.load();
    auto inflight = state.inflight_requests.load() + arriving;
    // Nothing in flight counts once every worker has been told, and twice in a row: a read the
    // reactor had already seen ready when the signal came is taken up in between.
    const bool idle = inflight == 0 && workers_told.load() == impl_->workers.size();
    const bool settled = idle && idle_once;
    idle_once = idle;
    const auto now = std::chrono::steady_clock::now();
    if (!settled && inflight != 0 && now >= drain_deadline && !state.shutdown_cut.load()) {
      // Requests with no answer yet get one (a 503 saying the gateway is shutting down) rather
      // than a closed connection: every wait under way ends now, and the answers have
      // kShutdownAnswerGrace to go out.
      spdlog::warn("shutdown deadline reached with {} request(s) in flight ({} of them still arriving); ending them",
                   inflight, arriving);
      state.shutdown_cut.store(true);
      for (auto& w : impl_->workers) {
        net::post(w->io, [worker = w.get()] {
          worker->deadlines.expire_all();
          for (auto* wait : worker->waits) wait->cancel();  // retry backoffs, lookups: answered now
        });
      }
      drain_deadline = now + kShutdownAnswerGrace;
    } else if (settled || (now >= drain_deadline && inflight == 0) ||
               (state.shutdown_cut.load() && (inflight == 0 || now >= drain_deadline))) {
      if (inflight != 0) spdlog::warn("{} request(s) still in flight; closing them", inflight);
      stop_workers();
      beast::error_code ignored;
      signals.cancel(ignored);
      return;
    }
    drain_timer.expires_after(std::chrono::milliseconds(10));
    drain_timer.async_wait([&](beast::error_code ec) {
      if (!ec) check_drained();
    });
  };
  int first_signal = 0;
  std::chrono::steady_clock::time_point first_signal_at;
  std::function<void(beast::error_code, int)> on_signal;
  const auto wait_signal = [&] {
    net::async_read(signals, net::buffer(&signal_info, sizeof signal_info), [&](beast::error_code ec, std::size_t) {
      on_signal(ec, static_cast<int>(signal_info.ssi_signo));
    });
  };
  on_signal = [&](beast::error_code ec, int signo) {
    if (ec) return;
    if (signo == SIGHUP) {
      spdlog::warn("SIGHUP: ignored (the configuration is not reloaded; restart to change it)");
      wait_signal();
      return;
    }
    // Slurm stops a job at its time limit with SIGTERM twice within milliseconds (one from the
    // time limit, one from the job's termination): that is one request to stop, not an operator
    // insisting, and must not cut the drain short.
    const auto now = std::chrono::steady_clock::now();
    if (drain_started.load() && signo == SIGTERM && first_signal == SIGTERM && now - first_signal_at < kRepeatedSigterm) {
      spdlog::info("SIGTERM again within {}ms of the first (as Slurm sends at a job's time limit): still draining",
                   std::chrono::duration_cast<std::chrono::milliseconds>(kRepeatedSigterm).count());
      wait_signal();
      return;
    }
    if (drain_started.exchange(true)) {
      // The requests cut now get no access-log line of their own: say how many there were.
      spdlog::warn("second signal ({}): exiting now, cutting {} request(s) in flight and {} still arriving", signo,
                   state.inflight_requests.load(), state.arriving_requests.load());
      exiting = true;
      stop_workers();
      drain_timer.cancel();
      return;
    }
    spdlog::info("signal {}: no longer accepting; letting {} in-flight request(s) finish, and {} still arriving be "
                 "read and answered (up to {}ms)",
                 signo, state.inflight_requests.load(), state.arriving_requests.load(),
                 state.config.timeouts.shutdown.count());
    state.stopping.store(true);
    first_signal = signo;
    first_signal_at = now;
    for (std::size_t i = 0; i < impl_->workers.size(); ++i) {
      tcp::acceptor* acceptor = impl_->acceptors[i].get();
      tcp::acceptor* metrics = i == 0 ? impl_->metrics_acceptor.get() : nullptr;
      Worker* worker = impl_->workers[i].get();
      net::post(worker->io, [acceptor, metrics, worker, &workers_told] {
        beast::error_code ignored;
        acceptor->close(ignored);
        if (metrics != nullptr) metrics->close(ignored);
        // Idle keep-alive clients are told now, by the close, not when the process exits;
        // requests in flight end with `Connection: close`.
        worker->deadlines.end_waits_between_requests();
        workers_told.fetch_add(1);
      });
    }
    drain_deadline = std::chrono::steady_clock::now() + state.config.timeouts.shutdown;
    wait_signal();
    check_drained();
  };
  wait_signal();

  std::vector<std::thread> threads;
  for (auto& w : impl_->workers) {
    threads.emplace_back([worker = w.get()] {
      for (;;) {
        try {
          worker->io.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("worker {}: unexpected exception: {}", worker->index, e.what());
        }
      }
    });
  }
  control.run();
  for (auto& t : threads) t.join();
  impl_->health.stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace infergate::gateway
