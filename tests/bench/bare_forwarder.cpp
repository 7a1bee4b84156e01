// infergate-bench-bare: the least an HTTP/1.1 proxy can do per request, run beside the peers in
// deploy/bench/run.sh as a ceiling. It forwards each request unchanged to the next backend in
// rotation over a pooled keep-alive connection and each response unchanged back: per request two
// receives and two sends, no header rewriting, no timeouts, no health, no metrics, no logging. No
// proxy that does the job can spend less, so its ratio to HAProxy in the same run is the most any
// proxy can reach on that machine. A measuring tool, not a product: it trusts its peers (whole
// heads in one read, Content-Length framing, no pipelining) and closes a connection otherwise.
//
// usage: infergate-bench-bare --port P [--threads N] [--peek] [--headers] BACKEND_PORT...
//   --peek:    look at a pooled connection before reusing it (one recv(MSG_PEEK)), as infergate does
//   --headers: add three request headers (X-Request-ID, X-Forwarded-For, Via), as infergate does
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace {

struct Options {
  int port = 0;
  int threads = 1;
  bool peek = false;
  bool headers = false;
  std::vector<int> backends;
};

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

sockaddr_in loopback(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

void tune(int fd) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Sends all of `data`; waits for room only when the peer's buffer is full (large bodies).
bool send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
    } else if (n < 0 && errno == EAGAIN) {
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, 10'000) <= 0) return false;
    } else {
      return false;
    }
  }
  return true;
}

// The length of the whole message that starts with `chunk` (head plus Content-Length body), or -1
// when the head is not complete in it.
long message_length(std::string_view chunk) {
  auto end = chunk.find("\r\n\r\n");
  if (end == std::string_view::npos) return -1;
  std::string_view head = chunk.substr(0, end + 2);
  long body = 0;
  for (std::size_t at = head.find("\r\n"); at != std::string_view::npos; at = head.find("\r\n", at + 2)) {
    std::string_view line = head.substr(at + 2);
    constexpr std::string_view kName = "content-length:";
    if (line.size() < kName.size()) continue;
    // ASCII letters, '-' and ':' all compare equal to kName's lower case with bit 0x20 set.
    if (!std::equal(kName.begin(), kName.end(), line.begin(), [](char a, char b) { return a == (b | 0x20); })) continue;
    std::size_t v = kName.size();
    while (v < line.size() && line[v] == ' ') ++v;
    std::from_chars(line.data() + v, line.data() + line.size(), body);
    break;
  }
  return static_cast<long>(end + 4) + body;
}

enum class Kind { unused, listener, client, upstream };

struct Conn {
  Fd fd;
  Kind kind = Kind::unused;
  int peer = -1;     // the connection this one's current message pairs with
  int backend = -1;  // upstream: index of its backend
  long left = 0;     // bytes of the message in flight still to come on this connection
};

class Worker {
 public:
  explicit Worker(const Options& options) : options_(options), pools_(options.backends.size()) {}

  void run() {
    epoll_ = Fd(::epoll_create1(0));
    int ls = ::socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0) die("socket");
    int one = 1;
    ::setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    ::setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    sockaddr_in a = loopback(options_.port);
    if (::bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(ls, 4096) != 0) die("listen");
    ::fcntl(ls, F_SETFL, O_NONBLOCK);
    adopt(ls, Kind::listener);
    std::array<epoll_event, 256> events{};
    for (;;) {
      int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), -1);
      for (int i = 0; i < n; ++i) handle(events[static_cast<std::size_t>(i)].data.fd);
    }
  }

 private:
  Conn& adopt(int fd, Kind kind) {
    if (static_cast<std::size_t>(fd) >= conns_.size()) conns_.resize(static_cast<std::size_t>(fd) + 64);
    Conn& c = conns_[static_cast<std::size_t>(fd)];
    c = Conn{};
    c.fd = Fd(fd);
    c.kind = kind;
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.fd = fd;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &e);
    return c;
  }

  Conn& at(int fd) { return conns_[static_cast<std::size_t>(fd)]; }

  void drop(int fd) {
    Conn& c = at(fd);
    if (c.kind == Kind::unused) return;
    if (c.kind == Kind::upstream) {
      auto& pool = pools_[static_cast<std::size_t>(c.backend)];
      std::erase(pool, fd);
    }
    int peer = c.peer;
    c.kind = Kind::unused;
    c.peer = -1;
    c.fd.reset();  // also leaves the epoll set
    if (peer >= 0 && at(peer).peer == fd) drop(peer);
  }

  int dial(std::size_t backend) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback(options_.backends[backend]);
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      if (fd >= 0) ::close(fd);
      return -1;
    }
    tune(fd);
    Conn& c = adopt(fd, Kind::upstream);
    c.backend = static_cast<int>(backend);
    return fd;
  }

  // A pooled connection to the next backend in rotation, or a new one.
  int upstream_for_next_request() {
    std::size_t backend = next_++ % pools_.size();
    auto& pool = pools_[backend];
    while (!pool.empty()) {
      int fd = pool.back();
      pool.pop_back();
      if (!options_.peek) return fd;
      char byte = 0;
      ssize_t n = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n < 0 && errno == EAGAIN) return fd;
      drop(fd);  // closed by the backend, or bytes nobody asked for
    }
    return dial(backend);
  }

  void handle(int fd) {
    Conn& c = at(fd);
    if (c.kind == Kind::listener) {
      for (int client; (client = ::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK)) >= 0;) {
        tune(client);
        adopt(client, Kind::client);
      }
      return;
    }
    if (c.kind == Kind::unused) return;
    ssize_t n = ::recv(fd, buffer_.data(), buffer_.size(), 0);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      drop(fd);
      return;
    }
    std::string_view chunk(buffer_.data(), static_cast<std::size_t>(n));
    if (c.kind == Kind::client) {
      from_client(fd, chunk);
    } else {
      from_upstream(fd, chunk);
    }
  }

  void from_client(int fd, std::string_view chunk) {
    Conn& c = at(fd);
    if (c.left == 0) {  // a new request
      long length = message_length(chunk);
      int up = length < 0 ? -1 : upstream_for_next_request();
      if (up < 0) {
        drop(fd);
        return;
      }
      Conn& u = at(up);
      Conn& client = at(fd);  // adopt() may have moved the table
      client.peer = up;
      client.left = length;
      u.peer = fd;
      u.left = 0;
      if (options_.headers) {
        std::size_t line = chunk.find("\r\n") + 2;
        with_headers_.assign(chunk.substr(0, line));
        with_headers_ += "X-Request-ID: ig-0-78855f02-";
        with_headers_ += std::to_string(++requests_);
        with_headers_ += "\r\nX-Forwarded-For: 127.0.0.1\r\nVia: 1.1 infergate\r\n";
        with_headers_.append(chunk.substr(line));
        client.left -= static_cast<long>(chunk.size());
        if (!send_all(up, with_headers_)) drop(up);
        return;
      }
    }
    Conn& client = at(fd);
    client.left -= static_cast<long>(chunk.size());
    if (client.peer < 0 || !send_all(client.peer, chunk)) drop(fd);
  }

  void from_upstream(int fd, std::string_view chunk) {
    Conn& u = at(fd);
    if (u.left == 0) {
      u.left = message_length(chunk);
      if (u.left < 0) {
        drop(fd);
        return;
      }
    }
    u.left -= static_cast<long>(chunk.size());
    int client = u.peer;
    if (client < 0 || !send_all(client, chunk)) {
      drop(fd);
      return;
    }
    if (u.left <= 0) {  // the response is whole: park the connection
      u.left = 0;
      u.peer = -1;
      at(client).peer = -1;
      at(client).left = 0;
      pools_[static_cast<std::size_t>(u.backend)].push_back(fd);
    }
  }

  const Options& options_;
  Fd epoll_;
  std::vector<Conn> conns_;
  std::vector<std::vector<int>> pools_;
  std::size_t next_ = 0;
  unsigned long requests_ = 0;
  std::array<char, 1 << 17> buffer_{};
  std::string with_headers_;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "infergate-bench-bare: %s needs a value\n", argv[i]);
        std::exit(2);
      }
      return std::atoi(argv[++i]);
    };
    if (arg == "--port") {
      o.port = value();
    } else if (arg == "--threads") {
      o.threads = value();
    } else if (arg == "--peek") {
      o.peek = true;
    } else if (arg == "--headers") {
      o.headers = true;
    } else {
      o.backends.push_back(std::atoi(argv[i]));
    }
  }
  if (o.port <= 0 || o.threads <= 0 || o.backends.empty() ||
      std::any_of(o.backends.begin(), o.backends.end(), [](int p) { return p <= 0; })) {
    std::fprintf(stderr,
                 "usage: infergate-bench-bare --port P [--threads N] [--peek] [--headers] BACKEND_PORT...\n");
    std::exit(2);
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  std::vector<std::jthread> threads;
  for (int t = 1; t < options.threads; ++t) threads.emplace_back([&options] { Worker(options).run(); });
  Worker(options).run();
}
