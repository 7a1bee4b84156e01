#include "harness.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>

extern char** environ;

namespace infergate::test {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

Process::Process(const std::string& binary, std::vector<std::string> args, std::vector<std::string> env) {
  static int counter = 0;
  stderr_path_ = "/tmp/infergate-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + ".stderr";
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");

  // The child's environment: ours minus Slurm's variables (a test must not see the real job's),
  // plus `env`, which replaces what it names.
  std::vector<std::string> environment;
  auto overridden = [&env](const std::string& kv) {
    const auto name = kv.substr(0, kv.find('=') + 1);
    return std::any_of(env.begin(), env.end(), [&name](const std::string& o) { return o.rfind(name, 0) == 0; });
  };
  for (char** e = environ; *e != nullptr; ++e) {
    std::string kv = *e;
    if (kv.rfind("SLURM_", 0) == 0 || kv.rfind("INFERGATE_", 0) == 0 || kv.rfind("NUM_TRAINING_NODES=", 0) == 0 ||
        kv.rfind("INFER_TP=", 0) == 0 || overridden(kv)) {
      continue;
    }
    environment.push_back(kv);
  }
  for (auto& kv : env) environment.push_back(kv);
  std::vector<char*> envp;
  for (auto& kv : environment) envp.push_back(kv.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_strings{binary};
  for (auto& a : args) argv_strings.push_back(a);
  std::vector<char*> argv;
  for (auto& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  int rc = ::posix_spawn(&pid_, binary.c_str(), &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    throw std::runtime_error("cannot start " + binary + ": " + std::strerror(rc));
  }
  stdout_fd_ = fds[0];
  reader_ = std::thread([this] {
    char buf[4096];
    for (;;) {
      auto n = ::read(stdout_fd_, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      std::lock_guard lock(mutex_);
      stdout_.append(buf, static_cast<std::size_t>(n));
    }
    stdout_closed_ = true;
  });
}

Process::~Process() {
  kill();
  if (reader_.joinable()) reader_.join();
  if (stdout_fd_ >= 0) ::close(stdout_fd_);
  std::remove(stderr_path_.c_str());
}

std::string Process::output() const {
  std::lock_guard lock(mutex_);
  return stdout_;
}

std::string Process::errors() const { return read_file(stderr_path_); }

void Process::reap(bool block) {
  if (exit_code_ || pid_ <= 0) return;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, block ? 0 : WNOHANG);
  if (r == pid_) {
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
}

bool Process::running() {
  reap(false);
  return !exit_code_;
}

std::string Process::wait_for_line(const std::regex& pattern, std::chrono::milliseconds deadline) {
  const auto until = Clock::now() + deadline;
  auto match = [&]() -> std::optional<std::string> {
    std::lock_guard lock(mutex_);
    std::smatch m;
    if (!std::regex_search(stdout_, m, pattern)) return std::nullopt;
    return m.size() > 1 ? m[1].str() : m[0].str();
  };
  while (Clock::now() < until) {
    if (auto found = match()) return *found;
    if (!running()) {
      // The process is gone, but the reader may not have drained the pipe yet: look once more
      // when it has (or at the deadline, if a child of the process still holds the pipe open).
      const auto left = std::max(until - Clock::now(), Clock::duration::zero());
      poll_until([this] { return stdout_closed_.load(); },
                 std::chrono::duration_cast<std::chrono::milliseconds>(left), 2ms);
      if (auto found = match()) return *found;
      break;
    }
    std::this_thread::sleep_for(5ms);  // polling the captured output, bounded by the deadline
  }
  throw std::runtime_error("process did not print the expected line; stdout: " + output() + "\nstderr: " + errors());
}

int Process::signal_and_wait(int signo, std::chrono::milliseconds deadline) {
  if (!running()) return *exit_code_;
  ::kill(pid_, signo);
  poll_until([this] { return !running(); }, deadline, 5ms);
  if (running()) return -1;
  return *exit_code_;
}

int Process::wait_exit(std::chrono::milliseconds deadline) {
  if (!poll_until([this] { return !running() && stdout_closed_.load(); }, deadline, 2ms)) return -1;
  return *exit_code_;
}

int Process::stop(std::chrono::milliseconds deadline) {
  int code = signal_and_wait(SIGTERM, deadline);
  if (code == -1) {
    kill();
    return -1;
  }
  return code;
}

void Process::kill() {
  if (pid_ <= 0 || exit_code_) return;
  ::kill(-pid_, SIGKILL);  // the whole process group
  reap(true);
}

std::string gateway_binary() {
  const char* v = std::getenv("INFERGATE_BIN");
  return v != nullptr && *v != '\0' ? v : INFERGATE_BIN;
}

std::string mock_binary() {
  const char* v = std::getenv("INFERGATE_MOCK_BIN");
  return v != nullptr && *v != '\0' ? v : INFERGATE_MOCK_BIN;
}

Mock start_mock(std::vector<std::string> args) {
  std::vector<std::string> all{"--host", "127.0.0.1", "--port", "0"};
  all.insert(all.end(), args.begin(), args.end());
  Mock m;
  m.process = std::make_unique<Process>(mock_binary(), all);
  m.port = std::stoi(m.process->wait_for_line(std::regex(R"(infergate-mock listening on 127\.0\.0\.1:(\d+))")));
  return m;
}

Gateway::~Gateway() {
  if (!process) return;
  process->stop(10s);
  const auto errors = process->errors();
  for (const char* report : {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                             "runtime error:", "WARNING: ThreadSanitizer"}) {
    if (errors.find(report) != std::string::npos) {
      ADD_FAILURE() << "the gateway's sanitizer reported a problem:\n" << errors;
      break;
    }
  }
}

Gateway start_gateway(std::vector<std::string> args, std::vector<std::string> env) {
  std::vector<std::string> all{"--no-slurm", "--listen", "127.0.0.1:0", "--threads", "2",
                               "--set", "health.interval=100ms", "--set", "health.healthy_threshold=1",
                               "--set", "health.unhealthy_threshold=1", "--set", "retries.backoff_base=5ms",
                               "--set", "retries.backoff_max=20ms"};
  all.insert(all.end(), args.begin(), args.end());
  // A gateway built with TSan reads its suppressions (false positives in libstdc++); others
  // ignore the variable.
  if (std::none_of(env.begin(), env.end(),
                   [](const std::string& kv) { return kv.rfind("TSAN_OPTIONS=", 0) == 0; })) {
    const char* tsan = std::getenv("TSAN_OPTIONS");
    std::string options = tsan != nullptr ? tsan : "";
    if (options.find("suppressions=") == std::string::npos) {
      options += (options.empty() ? "" : " ") +
                 std::string("suppressions=" INFERGATE_SOURCE_DIR "/tests/tsan.supp");
    }
    env.push_back("TSAN_OPTIONS=" + options);
  }
  Gateway g;
  g.process = std::make_unique<Process>(gateway_binary(), all, std::move(env));
  g.port = std::stoi(g.process->wait_for_line(std::regex(R"(infergate listening on http://127\.0\.0\.1:(\d+))")));
  return g;
}

std::string HttpResult::header(const std::string& name) const {
  auto it = headers.find(lower(name));
  return it == headers.end() ? std::string() : it->second;
}

HttpResult http_request(int port, const std::string& method, const std::string& target, const std::string& body,
                        const Headers& headers, std::chrono::milliseconds timeout) {
  HttpResult result;
  net::io_context io;
  beast::tcp_stream stream(io);
  beast::error_code ec;
  stream.expires_after(timeout);
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  if (ec) {
    result.error = "connect: " + ec.message();
    return result;
  }
  http::request<http::string_body> req{http::string_to_verb(method), target, 11};
  req.set(http::field::host, "127.0.0.1");
  bool has_content_type = false;
  for (const auto& [k, v] : headers) {
    req.insert(k, v);  // a name given twice is sent twice
    has_content_type = has_content_type || lower(k) == "content-type";
  }
  if (!body.empty() && !has_content_type) req.set(http::field::content_type, "application/json");
  req.body() = body;
  req.prepare_payload();
  // The deadline covers the whole exchange: run the async operations with the stream's timer.
  http::async_write(stream, req, [&](beast::error_code e, std::size_t) { ec = e; });
  io.run();
  io.restart();
  if (ec) {
    result.error = "write: " + ec.message();
    return result;
  }
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(256 * 1024 * 1024);
  if (method == "HEAD") parser.skip(true);
  http::async_read(stream, buffer, parser, [&](beast::error_code e, std::size_t) { ec = e; });
  io.run();
  if (ec) {
    result.error = "read: " + ec.message();
    return result;
  }
  auto& res = parser.get();
  result.status = res.result_int();
  for (const auto& f : res) result.headers[lower(std::string(f.name_string()))] = std::string(f.value());
  result.body = res.body();
  return result;
}

std::string StreamResult::body() const {
  std::string out;
  for (const auto& c : chunks) out += c.data;
  return out;
}

StreamResult http_stream(int port, const std::string& method, const std::string& target, const std::string& body,
                         std::chrono::milliseconds timeout, std::optional<std::size_t> stop_after) {
  StreamResult result;
  net::io_context io;
  beast::tcp_stream stream(io);
  beast::error_code ec;
  stream.expires_after(timeout);
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  if (ec) {
    result.error = "connect: " + ec.message();
    return result;
  }
  http::request<http::string_body> req{http::string_to_verb(method), target, 11};
  req.set(http::field::host, "127.0.0.1");
  req.set(http::field::content_type, "application/json");
  req.body() = body;
  req.prepare_payload();
  http::write(stream, req, ec);
  if (ec) {
    result.error = "write: " + ec.message();
    return result;
  }
  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  http::async_read_header(stream, buffer, parser, [&](beast::error_code e, std::size_t) { ec = e; });
  io.run();
  io.restart();
  if (ec) {
    result.error = "read header: " + ec.message();
    return result;
  }
  result.status = parser.get().result_int();
  for (const auto& f : parser.get()) result.headers[lower(std::string(f.name_string()))] = std::string(f.value());
  std::size_t total = 0;
  char buf[64 * 1024];
  while (!parser.is_done()) {
    parser.get().body().data = buf;
    parser.get().body().size = sizeof buf;
    http::async_read_some(stream, buffer, parser, [&](beast::error_code e, std::size_t) { ec = e; });
    io.run();
    io.restart();
    if (ec == http::error::need_buffer) ec = {};
    if (ec) {
      result.error = "read body: " + ec.message();
      return result;
    }
    auto n = sizeof buf - parser.get().body().size;
    if (n > 0) {
      result.chunks.push_back({Clock::now(), std::string(buf, n)});
      total += n;
    }
    if (stop_after && total >= *stop_after) {
      stream.socket().close(ec);
      result.error = "closed by the test";
      return result;
    }
  }
  result.complete = true;
  return result;
}

std::string raw_exchange(int port, const std::string& bytes, std::chrono::milliseconds timeout) {
  net::io_context io;
  beast::tcp_stream stream(io);
  beast::error_code ec;
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  if (ec) return "connect: " + ec.message();
  net::write(stream.socket(), net::buffer(bytes), ec);
  std::string out;
  char buf[16 * 1024];
  stream.expires_after(timeout);
  for (;;) {
    bool done = false;
    std::size_t got = 0;
    stream.async_read_some(net::buffer(buf), [&](beast::error_code e, std::size_t n) {
      ec = e;
      got = n;
      done = true;
    });
    io.run();
    io.restart();
    if (!done) break;
    out.append(buf, got);
    if (ec) break;
  }
  return out;
}

struct RawConnection::Impl {
  net::io_context io;
  tcp::socket socket{io};
  net::steady_timer timer{io};
};

RawConnection::RawConnection(int port) : impl_(std::make_unique<Impl>()) {
  beast::error_code ec;
  impl_->socket.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  closed_ = static_cast<bool>(ec);
}

RawConnection::~RawConnection() = default;

bool RawConnection::send(const std::string& bytes) {
  beast::error_code ec;
  net::write(impl_->socket, net::buffer(bytes), ec);
  return !ec;
}

void RawConnection::shutdown_write() {
  beast::error_code ignored;
  impl_->socket.shutdown(tcp::socket::shutdown_send, ignored);
}

// A timeout cancels the read and leaves the connection open (unlike beast::tcp_stream's).
bool RawConnection::read_until(const std::function<bool(const std::string&)>& done, std::chrono::milliseconds timeout) {
  const auto until = Clock::now() + timeout;
  char buf[16 * 1024];
  while (!done(received_) && !closed_ && Clock::now() < until) {
    bool finished = false;
    beast::error_code ec;
    std::size_t got = 0;
    impl_->timer.expires_at(until);
    impl_->timer.async_wait([this](beast::error_code e) {
      if (!e) impl_->socket.cancel();
    });
    impl_->socket.async_read_some(net::buffer(buf), [&](beast::error_code e, std::size_t n) {
      ec = e;
      got = n;
      finished = true;
      impl_->timer.cancel();
    });
    impl_->io.run();
    impl_->io.restart();
    if (!finished) break;
    received_.append(buf, got);
    if (ec == net::error::operation_aborted) break;  // the timeout
    if (ec) closed_ = true;                          // EOF or reset
  }
  return done(received_);
}

bool RawConnection::wait_closed(std::chrono::milliseconds timeout) {
  read_until([](const std::string&) { return false; }, timeout);
  return closed_;
}

bool has_whole_response(const std::string& bytes) {
  const auto end = bytes.find("\r\n\r\n");
  if (end == std::string::npos) return false;
  std::string head = bytes.substr(0, end);
  std::transform(head.begin(), head.end(), head.begin(), [](unsigned char ch) { return std::tolower(ch); });
  const auto at = head.find("\r\ncontent-length:");
  if (at == std::string::npos) return true;  // no body
  return bytes.size() >= end + 4 + std::stoul(head.substr(at + 17));
}

bool poll_until(const std::function<bool()>& condition, std::chrono::milliseconds deadline,
                std::chrono::milliseconds every) {
  const auto until = Clock::now() + deadline;
  for (;;) {
    if (condition()) return true;
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(every);
  }
}

std::string chat_body(bool stream, const std::string& extra) {
  std::string body = R"({"model":"mock-model","messages":[{"role":"user","content":"hello there"}])";
  if (stream) body += R"(,"stream":true)";
  if (!extra.empty()) body += "," + extra;
  return body + "}";
}

std::string raw_chat_request(const std::string& body) {
  return "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

double metric(int port, const std::string& name, const std::string& labels) {
  const auto body = http_request(port, "GET", "/metrics").body;
  const auto key = name + "{" + labels + "} ";
  const auto pos = body.find(key);
  if (pos == std::string::npos) return -1;
  return std::stod(body.substr(pos + key.size(), body.find('\n', pos) - pos - key.size()));
}

double gauge(int port, const std::string& name) {
  const auto body = http_request(port, "GET", "/metrics").body;
  std::smatch m;
  const std::regex line("\n" + name + " ([0-9.e+]+)");
  return std::regex_search(body, m, line) ? std::stod(m[1]) : -1.0;
}

}  // namespace infergate::test
