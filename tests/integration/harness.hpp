// Integration-test harness: real child processes (infergate, infergate-mock) on OS-chosen
// loopback ports, a small synchronous HTTP client, and polling with deadlines.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

namespace infergate::test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// A child process in its own process group, stdout captured, stderr in a file.
class Process {
 public:
  Process(const std::string& binary, std::vector<std::string> args, std::vector<std::string> env = {});
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // Waits until stdout has a line matching `pattern`; returns its first capture group (or the
  // whole line). Throws std::runtime_error with the process's stderr on timeout or exit.
  std::string wait_for_line(const std::regex& pattern, std::chrono::milliseconds deadline = 15s);
  std::string output() const;
  std::string errors() const;  // stderr so far
  int pid() const { return pid_; }
  bool running();
  // SIGTERM, wait (deadline), then SIGKILL. Returns the exit code (128+signal when killed).
  int stop(std::chrono::milliseconds deadline = 10s);
  int signal_and_wait(int signo, std::chrono::milliseconds deadline);
  void kill();
  // Waits for the process to exit on its own and for its stdout to be read to the end;
  // returns the exit code, or -1 on timeout.
  int wait_exit(std::chrono::milliseconds deadline = 10s);

 private:
  void reap(bool block);
  int pid_ = -1;
  int stdout_fd_ = -1;
  std::optional<int> exit_code_;
  std::string stderr_path_;
  mutable std::mutex mutex_;
  std::string stdout_;
  std::atomic<bool> stdout_closed_{false};
  std::thread reader_;
};

// The binaries under test: compiled-in paths, overridable with the INFERGATE_BIN and
// INFERGATE_MOCK_BIN environment variables (CI points INFERGATE_BIN at a sanitized build).
std::string gateway_binary();
std::string mock_binary();

struct Mock {
  std::unique_ptr<Process> process;
  int port = 0;
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port); }
  std::string id() const { return "127.0.0.1:" + std::to_string(port); }
};
Mock start_mock(std::vector<std::string> args = {});

struct Gateway {
  Gateway() = default;
  Gateway(Gateway&&) = default;
  Gateway& operator=(Gateway&&) = default;
  // Stops the gateway gracefully and fails the test if a sanitizer reported anything (CI runs
  // these tests against an ASan+UBSan build; a TSan build's reports count too, less the
  // false positives in tests/tsan.supp).
  ~Gateway();
  std::unique_ptr<Process> process;
  int port = 0;
};
// Starts infergate with --no-slurm on 127.0.0.1:0 and the given extra args (and environment).
// Fast health checks by default (interval 100ms, thresholds 1) unless the args override them.
Gateway start_gateway(std::vector<std::string> args, std::vector<std::string> env = {});

struct HttpResult {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::string error;  // transport error, empty on success
  std::string header(const std::string& name) const;
};
using Headers = std::vector<std::pair<std::string, std::string>>;

HttpResult http_request(int port, const std::string& method, const std::string& target,
                        const std::string& body = "", const Headers& headers = {},
                        std::chrono::milliseconds timeout = 10s);

struct StreamChunk {
  Clock::time_point at;
  std::string data;
};
struct StreamResult {
  int status = 0;
  std::map<std::string, std::string> headers;
  std::vector<StreamChunk> chunks;  // body bytes as they arrived
  std::string body() const;
  std::string error;
  bool complete = false;  // the response ended properly (not cut)
};
// Streams the response body; `stop_after` (if set) closes the connection after that many bytes.
StreamResult http_stream(int port, const std::string& method, const std::string& target,
                         const std::string& body, std::chrono::milliseconds timeout = 10s,
                         std::optional<std::size_t> stop_after = std::nullopt);

// Sends raw bytes and returns everything read until the server closes or the timeout passes.
std::string raw_exchange(int port, const std::string& bytes, std::chrono::milliseconds timeout = 5s);

// A client connection kept open across exchanges, for keep-alive behaviour.
class RawConnection {
 public:
  explicit RawConnection(int port);
  ~RawConnection();
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;
  bool send(const std::string& bytes);
  // Sends the end of stream (a half-close): the connection stays open for reading.
  void shutdown_write();
  // Reads until `done(everything received so far)` holds, the peer closes, or the timeout
  // passes; returns whether `done` held.
  bool read_until(const std::function<bool(const std::string&)>& done, std::chrono::milliseconds timeout = 5s);
  // Reads until the peer closes; returns whether it did within the timeout.
  bool wait_closed(std::chrono::milliseconds timeout = 5s);
  const std::string& received() const { return received_; }
  bool closed() const { return closed_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string received_;
  bool closed_ = false;
};

// Whether `bytes` hold one whole response with a Content-Length body.
bool has_whole_response(const std::string& bytes);

bool poll_until(const std::function<bool()>& condition, std::chrono::milliseconds deadline,
                std::chrono::milliseconds every = 20ms);

std::string chat_body(bool stream, const std::string& extra = "");
// A whole POST /v1/chat/completions request carrying `body` (Content-Length framed), for a
// RawConnection.
std::string raw_chat_request(const std::string& body);

// The value of a /metrics line with exactly these labels (`code="2xx"`), or -1.
double metric(int port, const std::string& name, const std::string& labels);
// A metric without labels (a gateway-wide gauge) from /metrics on `port`; -1 if absent.
double gauge(int port, const std::string& name);

}  // namespace infergate::test
