// infergate-mock: an HTTP server that behaves like vLLM's OpenAI-compatible server, for tests,
// the demo and benchmarks. It streams SSE as vLLM does, answers /health and /v1/models, and has
// fault modes (slow start, failures, hangs, dropped streams, closed keep-alive connections).
#include <sys/resource.h>
#include <sys/socket.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <optional>
#include <string>
#include <vector>

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
constexpr auto kTuple = net::as_tuple(net::use_awaitable);

namespace {

constexpr std::string_view kFailHeader = "X-Mock-Fail";

struct Options {
  std::string host = "127.0.0.1";
  int port = 9000;
  int port_count = 1;
  std::string model = "mock-model";
  int tokens = 16;
  int token_delay_ms = 0;
  int startup_delay_ms = 0;
  double fail_rate = 0;
  int fail_status = 500;
  long retry_after = -1;  // seconds; -1 = no Retry-After on injected failures
  unsigned seed = 1;
  bool hang = false;
  bool hang_after_header = false;
  bool drop_after_header = false;  // the response head, then the close: a server dying in the prefill
  bool drop_mid_stream = false;
  bool drop_request = false;  // close the connection on a completion request without answering
  int drop_delay_ms = 0;      // ... this long after reading it (a crash mid-generation)
  int close_after = 0;  // close each connection silently after N requests (0: never)
  bool own_request_ids = false;  // answer with ids of its own instead of echoing X-Request-ID
  // Echo X-Request-ID only when it is a UUID, else answer with an id of its own (as the
  // asgi-correlation-id middleware of FastAPI servers does).
  bool echo_uuid_ids_only = false;
  // A body limit like a server's (uvicorn, an nginx in front of vLLM): a request whose
  // Content-Length is above it is answered 413 from its head alone, and the connection closed
  // with the body unread (0: no limit).
  std::uint64_t max_body = 0;
  // Answers every completion request after a connection's first with 408 from its head and
  // closes with the body unread: a server closing a keep-alive connection for idleness just as
  // a request comes.
  bool idle_408 = false;
  // Closes a connection left idle this long between requests (uvicorn, vLLM's server, does after
  // 5 s; 0: never).
  int keep_alive_ms = 0;
  // /health requests this soon after start are never answered (a server stuck while loading).
  int hang_health_ms = 0;
  // /v1/models gives its model object a field nested this deep (a server that lies; 0: none).
  int models_nesting = 0;
  int models_delay_ms = 0;  // /v1/models answers this late (a server busy as it comes up)
  // A backend that lies about framing, on non-streamed completions: "extra-bytes" (bytes past
  // the promised body, in a later write), "cl-and-te" (Content-Length and chunked at once),
  // "bad-chunk" (a malformed chunk size before any body byte); "reset-after-reading" answers a
  // connection's first completion request, then reads the next one whole and resets the
  // connection (a server that aborts on a request it has read); "answer-late" sends a
  // connection's first completion answer again just before its sixth (an answer that comes
  // late, after the connection carried more requests than a short memory of ids covers).
  std::string lie;
  // Reads request bodies no faster than this many bytes per second (0: as fast as they come): a
  // server that takes a large prompt steadily but slowly.
  long read_rate = 0;
  bool quiet = false;
};

struct Stats {
  std::uint64_t requests = 0;  // completion-like requests
  std::int64_t open_connections = 0;
  std::uint64_t cancelled = 0;  // streams whose client went away before the end
  std::uint64_t models_requests = 0;  // GET /v1/models answered
  std::uint64_t lies = 0;       // --lie extra-bytes / answer-twice: stray responses written
  std::uint64_t raw_requests = 0;  // POST /mock/raw answered
  std::int64_t running = 0;        // completion-like requests being served now (vLLM's num_requests_running)
  std::int64_t max_running = 0;    // the most at once since start
};

// Counts a completion-like request as running while it is served.
struct Running {
  explicit Running(Stats& s) : stats(s) { stats.max_running = std::max(stats.max_running, ++stats.running); }
  ~Running() { --stats.running; }
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
  Stats& stats;
};

struct Server {
  Options options;
  Stats stats;
  Clock::time_point started = Clock::now();
  std::mt19937 rng;
  std::uniform_real_distribution<double> unit{0.0, 1.0};
};

[[noreturn]] void usage_error(const std::string& message) {
  if (!message.empty()) std::cerr << "infergate-mock: " << message << "\n";
  (message.empty() ? std::cout : std::cerr)
            << "usage: infergate-mock [--host H] [--port P] [--port-count K] [--model M] [--tokens N]\n"
               "  [--token-delay-ms MS] [--startup-delay-ms MS] [--fail-rate F] [--fail-status CODE] [--retry-after S]\n"
               "  [--seed S] [--hang] [--hang-after-header] [--drop-after-header] [--drop-mid-stream] [--drop-request] [--drop-delay-ms MS]\n"
               "  [--close-after N] [--lie extra-bytes|cl-and-te|bad-chunk|answer-twice|bad-early-answer|reset-after-reading|answer-late] [--own-request-ids] [--echo-uuid-ids-only] [--max-body BYTES]\n"
               "  [--idle-408] [--keep-alive-ms MS] [--hang-health-ms MS]\n"
               "  [--models-nesting N] [--models-delay-ms MS] [--read-rate BYTES_PER_S] [--quiet]\n";
  std::exit(message.empty() ? 0 : 2);
}

long parse_long(const std::string& flag, const std::string& v, long min, long max) {
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n < min || n > max) usage_error(flag + ": bad value '" + v + "'");
  return n;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + ": missing value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") usage_error("");
    else if (a == "--host") o.host = value();
    else if (a == "--port") o.port = static_cast<int>(parse_long(a, value(), 0, 65535));
    else if (a == "--port-count") o.port_count = static_cast<int>(parse_long(a, value(), 1, 65535));
    else if (a == "--model") o.model = value();
    else if (a == "--tokens") o.tokens = static_cast<int>(parse_long(a, value(), 0, 1000000));
    else if (a == "--token-delay-ms") o.token_delay_ms = static_cast<int>(parse_long(a, value(), 0, 3600000));
    else if (a == "--startup-delay-ms") o.startup_delay_ms = static_cast<int>(parse_long(a, value(), 0, 3600000));
    else if (a == "--fail-rate") {
      auto v = value();
      char* end = nullptr;
      o.fail_rate = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || o.fail_rate < 0 || o.fail_rate > 1) usage_error("--fail-rate: expected 0..1");
    } else if (a == "--fail-status") o.fail_status = static_cast<int>(parse_long(a, value(), 100, 599));
    else if (a == "--retry-after") o.retry_after = parse_long(a, value(), 0, 1000000);
    else if (a == "--seed") o.seed = static_cast<unsigned>(parse_long(a, value(), 0, 1L << 30));
    else if (a == "--hang") o.hang = true;
    else if (a == "--hang-after-header") o.hang_after_header = true;
    else if (a == "--drop-after-header") o.drop_after_header = true;
    else if (a == "--drop-mid-stream") o.drop_mid_stream = true;
    else if (a == "--drop-request") o.drop_request = true;
    else if (a == "--drop-delay-ms") o.drop_delay_ms = static_cast<int>(parse_long(a, value(), 0, 3600000));
    else if (a == "--close-after") o.close_after = static_cast<int>(parse_long(a, value(), 1, 1000000000));
    else if (a == "--own-request-ids") o.own_request_ids = true;
    else if (a == "--echo-uuid-ids-only") o.echo_uuid_ids_only = true;
    else if (a == "--idle-408") o.idle_408 = true;
    else if (a == "--keep-alive-ms") o.keep_alive_ms = static_cast<int>(parse_long(a, value(), 0, 3600000));
    else if (a == "--hang-health-ms") o.hang_health_ms = static_cast<int>(parse_long(a, value(), 0, 3600000));
    else if (a == "--models-nesting") o.models_nesting = static_cast<int>(parse_long(a, value(), 0, 10000000));
    else if (a == "--models-delay-ms") o.models_delay_ms = static_cast<int>(parse_long(a, value(), 0, 3600000));
    else if (a == "--read-rate") o.read_rate = parse_long(a, value(), 1, 1L << 40);
    else if (a == "--max-body") o.max_body = static_cast<std::uint64_t>(parse_long(a, value(), 1, 1L << 40));
    else if (a == "--lie") {
      o.lie = value();
      if (o.lie != "extra-bytes" && o.lie != "cl-and-te" && o.lie != "bad-chunk" && o.lie != "answer-twice" &&
          o.lie != "bad-early-answer" && o.lie != "reset-after-reading" && o.lie != "answer-late") {
        usage_error("--lie: expected extra-bytes, cl-and-te, bad-chunk, answer-twice, bad-early-answer, "
                    "reset-after-reading or answer-late");
      }
    } else if (a == "--quiet") o.quiet = true;
    else usage_error("unknown flag '" + a + "'");
  }
  return o;
}

std::string error_json(const std::string& message, const std::string& type, int code) {
  return json{{"object", "error"}, {"message", message}, {"type", type}, {"param", nullptr}, {"code", code}}.dump();
}

// vLLM's error body: {"object":"error","message":...,"type":...,"code":...}; the OpenAI client
// also accepts the nested {"error":{...}} shape, which is what we return.
std::string openai_error(const std::string& message, const std::string& type, int code) {
  return json{{"error", json::parse(error_json(message, type, code))}}.dump();
}

int count_words(const std::string& text) {
  std::istringstream in(text);
  int n = 0;
  for (std::string w; in >> w;) ++n;
  return n;
}

std::string token_text(int i) { return "tok" + std::to_string(i) + " "; }

struct Completion {
  bool chat = true;
  bool stream = false;
  bool include_usage = false;
  int n = 1;
  int max_tokens = 0;
  int prompt_tokens = 0;
  std::string model;
};

// Parses a chat/completions request; returns an error message when it is not one.
std::string parse_completion(const std::string& body, bool chat, const Options& o, Completion& c) {
  auto j = json::parse(body, nullptr, false);
  if (j.is_discarded()) return "request body is not valid JSON";
  if (!j.is_object()) return "request body must be a JSON object";
  c.chat = chat;
  c.model = j.value("model", o.model);
  if (!j.contains("model") || !j["model"].is_string()) c.model = o.model;
  c.stream = j.value("stream", false);
  c.n = j.value("n", 1);
  if (c.n < 1 || c.n > 128) return "n must be between 1 and 128";
  c.max_tokens = j.contains("max_tokens") && j["max_tokens"].is_number_integer() ? j["max_tokens"].get<int>() : o.tokens;
  if (c.max_tokens < 0) return "max_tokens must be at least 0";
  if (j.contains("stream_options") && j["stream_options"].is_object()) {
    c.include_usage = j["stream_options"].value("include_usage", false);
  }
  if (chat) {
    if (!j.contains("messages") || !j["messages"].is_array()) return "'messages' is required";
    for (const auto& m : j["messages"]) {
      if (m.is_object() && m.contains("content") && m["content"].is_string()) {
        c.prompt_tokens += count_words(m["content"].get<std::string>());
      }
    }
  } else {
    if (!j.contains("prompt")) return "'prompt' is required";
    if (j["prompt"].is_string()) c.prompt_tokens = count_words(j["prompt"].get<std::string>());
  }
  return {};
}

json usage_json(const Completion& c) {
  const int completion = c.max_tokens * c.n;
  return {{"prompt_tokens", c.prompt_tokens}, {"completion_tokens", completion},
          {"total_tokens", c.prompt_tokens + completion}};
}

// Responses carry the server's start time as `created`, so two identical requests get
// byte-identical answers (tests compare proxied and direct bodies).
std::int64_t g_created = 0;

std::int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string full_completion(const Completion& c, const std::string& id) {
  std::string text;
  for (int i = 0; i < c.max_tokens; ++i) text += token_text(i);
  json choices = json::array();
  for (int i = 0; i < c.n; ++i) {
    if (c.chat) {
      choices.push_back({{"index", i}, {"message", {{"role", "assistant"}, {"content", text}}},
                         {"logprobs", nullptr}, {"finish_reason", "length"}});
    } else {
      choices.push_back({{"index", i}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", "length"}});
    }
  }
  return json{{"id", id}, {"object", c.chat ? "chat.completion" : "text_completion"}, {"created", g_created},
              {"model", c.model}, {"choices", choices}, {"usage", usage_json(c)}}
      .dump();
}

std::string sse(const json& chunk) { return "data: " + chunk.dump() + "\n\n"; }

std::string chunk_frame(const std::string& data) {
  char size[32];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  return size + data + "\r\n";
}

bool peer_closed(tcp::socket& socket) {
  char byte = 0;
  auto n = ::recv(socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
}

std::string address_of(const tcp::socket& socket) {
  beast::error_code ec;
  auto ep = socket.local_endpoint(ec);
  return ec ? std::string("?") : ep.address().to_string() + ":" + std::to_string(ep.port());
}

net::awaitable<void> sleep_for(std::chrono::milliseconds d) {
  net::steady_timer t(co_await net::this_coro::executor, d);
  co_await t.async_wait(kTuple);
}

net::awaitable<void> hang_forever() {
  net::steady_timer t(co_await net::this_coro::executor, Clock::time_point::max());
  co_await t.async_wait(kTuple);
}

// Streams a completion as vLLM does. Returns false when the connection must close.
net::awaitable<bool> stream_completion(Server* server, tcp::socket* socket, Completion c, std::string id,
                                       std::string request_id) {
  const auto& o = server->options;
  std::string head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     "Transfer-Encoding: chunked\r\nX-Backend: " + address_of(*socket) + "\r\n";
  if (!request_id.empty()) head += "X-Request-ID: " + request_id + "\r\n";
  head += "\r\n";
  auto [hec, hn] = co_await net::async_write(*socket, net::buffer(head), kTuple);
  if (hec) co_return false;
  if (o.hang_after_header) {
    co_await hang_forever();
    co_return false;
  }
  if (o.drop_after_header) co_return false;
  const auto created = g_created;
  const char* object = c.chat ? "chat.completion.chunk" : "text_completion";
  auto send = [&](const std::string& event) -> net::awaitable<bool> {
    auto frame = chunk_frame(event);
    auto [ec, n] = co_await net::async_write(*socket, net::buffer(frame), kTuple);
    co_return !ec;
  };
  auto chunk_with = [&](json choices) {
    return json{{"id", id}, {"object", object}, {"created", created}, {"model", c.model}, {"choices", choices}};
  };
  if (c.chat) {
    json choices = json::array();
    for (int i = 0; i < c.n; ++i) {
      choices.push_back({{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                         {"finish_reason", nullptr}});
    }
    if (!co_await send(sse(chunk_with(choices)))) {
      ++server->stats.cancelled;
      co_return false;
    }
  }
  for (int t = 0; t < c.max_tokens; ++t) {
    if (t > 0 && o.token_delay_ms > 0) co_await sleep_for(std::chrono::milliseconds(o.token_delay_ms));
    if (peer_closed(*socket)) {
      ++server->stats.cancelled;
      co_return false;
    }
    if (o.drop_mid_stream && t == c.max_tokens / 2) {
      beast::error_code ignored;
      socket->close(ignored);  // mid-response, without the terminating chunk
      co_return false;
    }
    std::string events;
    for (int i = 0; i < c.n; ++i) {
      json choice = c.chat ? json{{"index", i}, {"delta", {{"content", token_text(t)}}}, {"logprobs", nullptr},
                                  {"finish_reason", nullptr}}
                           : json{{"index", i}, {"text", token_text(t)}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
      events += sse(chunk_with(json::array({choice})));
    }
    if (!co_await send(events)) {
      ++server->stats.cancelled;
      co_return false;
    }
  }
  std::string tail;
  for (int i = 0; i < c.n; ++i) {
    json choice = c.chat ? json{{"index", i}, {"delta", json::object()}, {"logprobs", nullptr}, {"finish_reason", "length"}}
                         : json{{"index", i}, {"text", ""}, {"logprobs", nullptr}, {"finish_reason", "length"}};
    tail += sse(chunk_with(json::array({choice})));
  }
  if (c.include_usage) {
    auto usage_chunk = chunk_with(json::array());
    usage_chunk["usage"] = usage_json(c);
    tail += sse(usage_chunk);
  }
  tail += "data: [DONE]\n\n";
  if (!co_await send(tail)) {
    ++server->stats.cancelled;
    co_return false;
  }
  auto [ec, n] = co_await net::async_write(*socket, net::buffer(std::string_view("0\r\n\r\n")), kTuple);
  co_return !ec;
}

using Response = http::response<http::string_body>;

// --lie: answers `body` with broken framing. Returns whether the connection stays usable.
net::awaitable<bool> tell_lie(Server* server, tcp::socket& socket, const std::string& body,
                              const std::string& request_id) {
  const auto& lie = server->options.lie;
  std::string out = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n";
  if (!request_id.empty()) out += "X-Request-ID: " + request_id + "\r\n";
  if (lie == "answer-twice") {
    // The whole answer, and 100 ms later the same answer again, nobody having asked: the next
    // request on this connection would be answered with this one's.
    out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    auto [ec, n] = co_await net::async_write(socket, net::buffer(out), kTuple);
    if (ec) co_return false;
    co_await sleep_for(std::chrono::milliseconds(100));
    auto [sec, sn] = co_await net::async_write(socket, net::buffer(out), kTuple);
    if (!sec) ++server->stats.lies;
    co_return !sec;
  }
  if (lie == "bad-chunk") {
    out += "Transfer-Encoding: chunked\r\n\r\nzz\r\n";
    co_await net::async_write(socket, net::buffer(out), kTuple);
    co_return false;
  }
  if (lie == "cl-and-te") {
    char size[32];
    std::snprintf(size, sizeof size, "%zx", body.size());
    out += "Content-Length: " + std::to_string(body.size() + 100) + "\r\nTransfer-Encoding: chunked\r\n\r\n" + size +
           "\r\n" + body + "\r\n0\r\n\r\n";
    auto [ec, n] = co_await net::async_write(socket, net::buffer(out), kTuple);
    co_return !ec;
  }
  // extra-bytes: a correct response, then a second "response" nobody asked for, a moment later.
  out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  auto [ec, n] = co_await net::async_write(socket, net::buffer(out), kTuple);
  if (ec) co_return false;
  co_await sleep_for(std::chrono::milliseconds(20));
  const std::string stray = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED";
  auto [sec, sn] = co_await net::async_write(socket, net::buffer(stray), kTuple);
  if (!sec) ++server->stats.lies;
  co_return !sec;
}

Response make_response(http::status status, std::string body, const std::string& content_type = "application/json") {
  Response res{status, 11};
  res.set(http::field::server, "infergate-mock");
  res.set(http::field::content_type, content_type);
  res.body() = std::move(body);
  return res;
}

net::awaitable<void> session(Server* server, tcp::socket socket) {
  auto& o = server->options;
  // Counted down however the session ends (an exception included: a detached coroutine's is
  // dropped silently).
  struct OpenConnection {
    std::int64_t* count;
    explicit OpenConnection(std::int64_t* c) : count(c) { ++*count; }
    ~OpenConnection() { --*count; }
    OpenConnection(const OpenConnection&) = delete;
    OpenConnection& operator=(const OpenConnection&) = delete;
  } open_connection(&server->stats.open_connections);
  beast::flat_buffer buffer;
  const std::string self = address_of(socket);
  int served = 0;
  int completions_seen = 0;  // for --idle-408
  int completions_read = 0;  // for --lie reset-after-reading
  int completions_answered = 0;  // for --lie answer-late
  std::string first_answer;      // for --lie answer-late
  net::steady_timer idle(socket.get_executor());  // for --keep-alive-ms
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(64ULL * 1024 * 1024);
    parser.header_limit(256 * 1024);
    if (o.keep_alive_ms > 0 && buffer.size() == 0) {
      idle.expires_after(std::chrono::milliseconds(o.keep_alive_ms));
      idle.async_wait([&socket](beast::error_code ec) {
        if (!ec) socket.close(ec);  // idle for too long: closed, as uvicorn does
      });
    }
    auto [hec, hn] = co_await http::async_read_header(socket, buffer, parser, kTuple);
    idle.cancel();
    if (hec) break;
    const std::string head_target(parser.get().target());
    const bool completion_head = head_target.starts_with("/v1/chat/completions") || head_target.starts_with("/v1/completions");
    if (o.idle_408 && completion_head && completions_seen++ > 0) {
      auto res = make_response(http::status::request_timeout, "");
      res.keep_alive(false);
      res.prepare_payload();
      co_await http::async_write(socket, res, kTuple);
      break;
    }
    if (o.max_body > 0 && parser.content_length().value_or(0) > o.max_body && o.lie == "bad-early-answer") {
      // The same early answer, with a malformed head (bare LF line ends).
      const std::string bad = "HTTP/1.1 413 Payload Too Large\nContent-Length: 0\n\n";
      co_await net::async_write(socket, net::buffer(bad), kTuple);
      ++server->stats.lies;
      break;
    }
    if (o.max_body > 0 && parser.content_length().value_or(0) > o.max_body) {
      // Answered before the body is read, then closed with it unread (the kernel resets the
      // connection): what a server's body limit does.
      auto res = make_response(http::status::payload_too_large,
                               openai_error("request body is larger than " + std::to_string(o.max_body) + " bytes",
                                            "BadRequestError", 413));
      res.keep_alive(false);
      res.prepare_payload();
      co_await http::async_write(socket, res, kTuple);
      break;
    }
    beast::error_code rec;
    if (o.read_rate > 0) {
      // A read takes what is there (at most 64 KiB); the next waits until the bytes read so far
      // are due at the rate.
      buffer.reserve(64 * 1024);
      const auto start = Clock::now();
      std::uint64_t taken = 0;
      while (!rec && !parser.is_done()) {
        auto [ec, n] = co_await http::async_read_some(socket, buffer, parser, kTuple);
        rec = ec;
        taken += n;
        const auto due = start + std::chrono::microseconds(taken * 1000000 / static_cast<std::uint64_t>(o.read_rate));
        if (due > Clock::now()) {
          co_await sleep_for(std::chrono::ceil<std::chrono::milliseconds>(due - Clock::now()));
        }
      }
    } else {
      rec = std::get<0>(co_await http::async_read(socket, buffer, parser, kTuple));
    }
    if (rec) break;
    auto req = parser.release();
    const std::string target(req.target());
    const std::string path = target.substr(0, target.find('?'));
    const std::string request_id(req["X-Request-ID"]);
    const bool completion_like = path == "/v1/chat/completions" || path == "/v1/completions" || path == "/generate";
    if (completion_like) ++server->stats.requests;
    std::optional<Running> running;
    if (completion_like) running.emplace(server->stats);
    if (completion_like && o.lie == "reset-after-reading" && completions_read++ > 0) {
      ++server->stats.lies;
      beast::error_code ignored;
      socket.set_option(net::socket_base::linger(true, 0), ignored);  // the close sends a reset, no FIN
      socket.close(ignored);
      co_return;
    }
    if (completion_like && o.drop_request) {
      if (o.drop_delay_ms > 0) co_await sleep_for(std::chrono::milliseconds(o.drop_delay_ms));
      break;
    }
    static std::uint64_t counter = 0;
    const std::string completion_id =
        "cmpl-" + (request_id.empty() ? "mock-" + std::to_string(++counter) : request_id);

    const bool starting = Clock::now() - server->started < std::chrono::milliseconds(o.startup_delay_ms);
    if (path == "/health" && Clock::now() - server->started < std::chrono::milliseconds(o.hang_health_ms)) {
      co_await hang_forever();
      break;
    }
    if (o.hang && path != "/mock/stats") {
      co_await hang_forever();
      break;
    }
    if (path == "/mock/raw" && req.method() == http::verb::post) {
      // The request's body is the answer, byte for byte, then the close: for framing tests
      // (answers no server of ours would make).
      ++server->stats.raw_requests;
      co_await net::async_write(socket, net::buffer(req.body()), kTuple);
      break;
    }
    Response res;
    bool streamed = false;
    bool keep_open = true;
    if (path == "/health") {
      res = make_response(starting ? http::status::service_unavailable : http::status::ok, "");
    } else if (path == "/mock/stats") {
      res = make_response(http::status::ok, json{{"requests", server->stats.requests},
                                                 {"open_connections", server->stats.open_connections},
                                                 {"cancelled", server->stats.cancelled},
                                                 {"lies", server->stats.lies},
                                                 {"raw_requests", server->stats.raw_requests},
                                                 {"running", server->stats.running},
                                                 {"max_running", server->stats.max_running},
                                                 {"models_requests", server->stats.models_requests}}
                                                .dump());
    } else if (starting) {
      res = make_response(http::status::service_unavailable, openai_error("server is starting", "ServiceUnavailable", 503));
    } else if (path == "/v1/models") {
      if (o.models_delay_ms > 0) co_await sleep_for(std::chrono::milliseconds(o.models_delay_ms));
      ++server->stats.models_requests;
      res = make_response(http::status::ok,
                          json{{"object", "list"},
                               {"data", json::array({{{"id", o.model}, {"object", "model"}, {"created", unix_now()},
                                                      {"owned_by", "infergate-mock"}, {"root", o.model},
                                                      {"max_model_len", 32768}}})}}
                              .dump());
      if (o.models_nesting > 0) {  // spliced in as text: the JSON library would recurse as deep
        const auto at = res.body().find("\"object\":\"model\"");
        res.body().insert(at, "\"meta\":" + std::string(static_cast<std::size_t>(o.models_nesting), '[') +
                                  std::string(static_cast<std::size_t>(o.models_nesting), ']') + ",");
      }
    } else if (path == "/echo" && req.method() == http::verb::post) {
      res = make_response(http::status::ok, req.body(), std::string(req[http::field::content_type]));
    } else if (completion_like && req.method() == http::verb::post) {
      Completion c;
      std::string error;
      if (path == "/generate") {
        auto j = json::parse(req.body(), nullptr, false);
        if (j.is_discarded() || !j.is_object() || !j.contains("prompt")) {
          error = "expected {\"prompt\": ...}";
        } else {
          c.chat = false;
          c.max_tokens = j.contains("max_tokens") && j["max_tokens"].is_number_integer() ? j["max_tokens"].get<int>() : o.tokens;
          c.stream = j.value("stream", false);
          c.model = o.model;
        }
      } else {
        error = parse_completion(req.body(), path == "/v1/chat/completions", o, c);
      }
      if (!error.empty()) {
        res = make_response(http::status::bad_request, openai_error(error, "BadRequestError", 400));
      } else if (const auto forced = req[kFailHeader]; !forced.empty() ||
                 (o.fail_rate > 0 && server->unit(server->rng) < o.fail_rate)) {
        // X-Mock-Fail: STATUS fails this one request: tests choose exactly which requests fail.
        const int status = forced.empty() ? o.fail_status : std::clamp(std::atoi(std::string(forced).c_str()), 500, 599);
        res = make_response(static_cast<http::status>(status),
                            openai_error("injected failure", "InternalServerError", status));
        if (o.retry_after >= 0) res.set(http::field::retry_after, std::to_string(o.retry_after));
      } else if (path == "/generate" && !c.stream) {
        std::string text;
        for (int i = 0; i < c.max_tokens; ++i) text += token_text(i);
        res = make_response(http::status::ok, json{{"text", json::array({text})}}.dump());
      } else if (c.stream) {
        keep_open = co_await stream_completion(server, &socket, c, completion_id, request_id) && req.keep_alive();
        streamed = true;
      } else {
        if (o.hang_after_header || o.drop_after_header) {
          std::string head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
          co_await net::async_write(socket, net::buffer(head), kTuple);
          if (o.hang_after_header) co_await hang_forever();
          break;
        }
        // Like vLLM, a non-streamed answer comes when the last token is generated.
        if (o.token_delay_ms > 0 && c.max_tokens > 1) {
          co_await sleep_for(std::chrono::milliseconds(o.token_delay_ms) * (c.max_tokens - 1));
          if (peer_closed(socket)) {
            ++server->stats.cancelled;
            break;
          }
        }
        res = make_response(http::status::ok, full_completion(c, completion_id));
        if (o.lie == "extra-bytes" || o.lie == "cl-and-te" || o.lie == "bad-chunk" || o.lie == "answer-twice") {
          keep_open = co_await tell_lie(server, socket, res.body(), request_id) && req.keep_alive();
          ++served;
          if (!keep_open) break;
          continue;
        }
        if (req["X-Mock-Echo-Headers"] == "1") {
          auto j = json::parse(res.body());
          json headers = json::object();
          for (const auto& f : req) {  // a field given twice is one list (RFC 9110 5.3)
            const std::string name(f.name_string());
            headers[name] = headers.contains(name) ? headers[name].get<std::string>() + ", " + std::string(f.value())
                                                   : std::string(f.value());
          }
          j["received_headers"] = headers;
          res.body() = j.dump();
        }
      }
    } else {
      res = make_response(http::status::not_found, openai_error("no route " + path, "NotFoundError", 404));
    }
    if (!streamed) {
      res.set("X-Backend", self);
      const bool uuid = request_id.size() == 36 && request_id[8] == '-' && request_id[13] == '-' &&
                        request_id[18] == '-' && request_id[23] == '-';
      if (o.own_request_ids || (o.echo_uuid_ids_only && !uuid)) {
        res.set("X-Request-ID", "mock-own-" + std::to_string(served));
      } else if (!request_id.empty()) {
        res.set("X-Request-ID", request_id);
      }
      res.keep_alive(req.keep_alive());
      res.prepare_payload();
      if (o.lie == "answer-late" && completion_like) {
        ++completions_answered;
        if (completions_answered == 1) {
          std::ostringstream first;
          first << res;
          first_answer = first.str();
        } else if (completions_answered == 6) {
          auto [lec, ln] = co_await net::async_write(socket, net::buffer(first_answer), kTuple);
          if (!lec) ++server->stats.lies;
        }
      }
      auto [wec, wn] = co_await http::async_write(socket, res, kTuple);
      keep_open = !wec && req.keep_alive();
    }
    ++served;
    if (!keep_open || (o.close_after > 0 && served >= o.close_after)) break;
  }
  beast::error_code ignored;
  socket.shutdown(tcp::socket::shutdown_send, ignored);
  socket.close(ignored);
}

net::awaitable<void> accept_loop(Server* server, tcp::acceptor* acceptor) {
  for (;;) {
    auto [ec, socket] = co_await acceptor->async_accept(kTuple);
    if (ec) {
      if (!acceptor->is_open()) co_return;
      co_await sleep_for(std::chrono::milliseconds(20));  // out of descriptors: try again shortly
      continue;
    }
    // Like vLLM and SGLang (uvicorn sets it on every connection): a small SSE event goes out at
    // once instead of waiting, under Nagle's algorithm, for the ACK of the one before.
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    net::co_spawn(acceptor->get_executor(), session(server, std::move(socket)), net::detached);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Server server;
  server.options = parse_options(argc, argv);
  server.rng.seed(server.options.seed);
  g_created = unix_now();
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
  net::io_context io(1);
  std::vector<std::unique_ptr<tcp::acceptor>> acceptors;
  try {
    auto address = net::ip::make_address(server.options.host);
    for (int i = 0; i < server.options.port_count; ++i) {
      const int port = server.options.port == 0 ? 0 : server.options.port + i;
      auto acceptor = std::make_unique<tcp::acceptor>(io);
      tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
      acceptor->open(endpoint.protocol());
      acceptor->set_option(net::socket_base::reuse_address(true));
      // A slow reader's bytes wait in the sender's buffers, not in a receive buffer the kernel
      // would grow to tens of MiB (accepted connections inherit the listener's size).
      if (server.options.read_rate > 0) acceptor->set_option(net::socket_base::receive_buffer_size(64 * 1024));
      acceptor->bind(endpoint);
      acceptor->listen(net::socket_base::max_listen_connections);
      std::printf("infergate-mock listening on %s:%u\n", server.options.host.c_str(),
                  static_cast<unsigned>(acceptor->local_endpoint().port()));
      acceptors.push_back(std::move(acceptor));
    }
    std::fflush(stdout);
  } catch (const std::exception& e) {
    std::cerr << "infergate-mock: cannot listen on " << server.options.host << ":" << server.options.port << ": "
              << e.what() << "\n";
    return 1;
  }
  for (auto& a : acceptors) net::co_spawn(io, accept_loop(&server, a.get()), net::detached);
  net::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](const beast::error_code&, int) { io.stop(); });
  io.run();
  return 0;
}
