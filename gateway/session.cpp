#include "gateway/session.hpp"

#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <variant>

#include <boost/container/small_vector.hpp>

#include "config/units.hpp"
#include "discovery/http1.hpp"
#include "discovery/resolve.hpp"
#include "gateway/admission.hpp"
#include "gateway/errors.hpp"
#include "gateway/router.hpp"
#include "gateway/usage_scanner.hpp"

namespace infergate::gateway {
namespace {

using Clock = std::chrono::steady_clock;
using http1::iequals;
constexpr auto kTuple = net::as_tuple(net::use_awaitable);
// For the per-request reads and writes: a deferred operation is awaited directly, without the
// extra coroutine frame use_awaitable allocates for every operation.
constexpr auto kDirect = net::as_tuple(net::deferred);

constexpr std::size_t kClientRead = 2048;       // free space per client read; grows for large prompts
constexpr std::size_t kBodyRoom = 1024 * 1024;  // room taken for a body before any of it has come
constexpr std::size_t kUpstreamRead = 4096;     // free space for a response head
constexpr std::size_t kRelayMax = 64 * 1024;    // a relay read grows up to this while reads fill it
constexpr std::size_t kStreamRelay = 1024;      // an SSE stream's buffer: events are a few hundred bytes
constexpr std::size_t kStreamRelayMax = 16 * 1024;
constexpr std::string_view kCrlf = "\r\n";
// How soon after the request a reused connection must fail to count as one the backend had
// already closed while it was parked (the close is then on its way or there): a round trip on a
// busy network, well below the time any model takes to fail a request it accepted.
constexpr auto kStaleConnectionWindow = std::chrono::milliseconds(250);

class StreamRelay;
void adopt_upstream(StreamRelay& relay, std::unique_ptr<UpstreamConnection> up);

// Shared between an attempt and the readiness watch on its client: the watch's completion may
// run after the attempt ended, so it checks the generation it was started for.
struct ClientWatch {
  std::uint64_t generation = 0;
  bool active = false;
  bool client_gone = false;
  UpstreamConnection* connection = nullptr;
  char byte = 0;
};

// Counts a request in GatewayState::arriving_requests from its first byte until it is read
// whole and counted in flight (or the connection ends).
class ArrivingRequest {
 public:
  explicit ArrivingRequest(std::atomic<std::int64_t>& counter) : counter_(counter) {}
  ~ArrivingRequest() { end(); }
  ArrivingRequest(const ArrivingRequest&) = delete;
  ArrivingRequest& operator=(const ArrivingRequest&) = delete;
  void begin() noexcept {
    if (!counted_) counter_.fetch_add(1, std::memory_order_relaxed);
    counted_ = true;
  }
  void end() noexcept {
    if (counted_) counter_.fetch_sub(1, std::memory_order_relaxed);
    counted_ = false;
  }

 private:
  std::atomic<std::int64_t>& counter_;
  bool counted_ = false;
};

// One client connection's state, kept between its requests so buffers are reused.
struct ClientConnection final : SlowHook {
  ClientConnection(Worker* w, tcp::socket s)
      : sock(w->deadlines, std::move(s)),
        stopping(&w->state->stopping),
        arriving(w->state->arriving_requests),
        body_memory(&w->state->body_memory) {}
  ~ClientConnection() = default;
  // Whether the answer to the current request may keep the connection open: the client asked
  // for it and the gateway is not shutting down (then the answer says `Connection: close`).
  bool keep_alive() const noexcept { return head.keep_alive() && !stopping->load(std::memory_order_relaxed); }
  TimedSocket sock;
  const std::atomic<bool>* stopping;
  ArrivingRequest arriving;  // from the request's first byte until it is counted in flight
  BodyReservation body_memory;  // the current request's body, against limits.max_body_memory
  http1::ByteBuffer buffer;
  http1::Head head;             // the current request's head: views into `buffer`
  std::string_view body;        // the current request's body: in `buffer` or `chunked_body`
  std::string chunked_body;     // a chunked request body, de-chunked
  std::size_t request_size = 0; // bytes of `buffer` the current request occupies
  bool request_released = false;
  std::uint64_t requests = 0;   // read on this connection so far
  std::string upstream_head;    // the request head as backends get it (kept for retries), and a
                                // small body copied behind it (see kCoalesceMax)
  std::size_t upstream_head_size = 0;  // of the head alone
  std::string response_head;
  std::string client_ip;
  std::string request_id;       // the current request's X-Request-ID (kept or generated)
  std::string_view method;      // for logs; point into `labels` once the request is released
  std::string_view target;
  std::string absolute_target;  // "/?query" made from an absolute-form target with no path
  std::string labels;
  std::shared_ptr<ClientWatch> watch;
  bool watching = false;
  // The next read tries the socket before waiting on the reactor: a new client's request has
  // usually arrived by the time the connection is accepted.
  bool read_directly = true;
  std::shared_ptr<StreamRelay> handoff;  // set when a StreamRelay took the stream over
  bool reset_on_close = false;  // a close-delimited response was cut: reset, not close (see RelayPlan)
  bool lingered = false;        // drain_before_close has read what the client sent, and ended
  bool linger_on_close = false;  // a whole answer the gateway ends the connection after (linger_close)
  UsageScanner usage;  // of the response being relayed (here, not in relay_response's frame)
  // timeouts.total for the current request: no socket operation of its exchange waits past it.
  Clock::time_point total_deadline = Clock::time_point::max();
  Clock::time_point request_started;  // for the access log; backend metrics time each attempt
  // limits.max_inflight_per_backend: when the current request first queued for a place (min:
  // not yet: its turn in the queue), and the backends the queue gave it, held for the request
  // (one may be a backend added after the request came, absent from the snapshots it holds, and
  // the addresses in its list of backends tried must stay theirs). Here rather than in
  // proxy_request's frame, allocated per request.
  Clock::time_point queued_since = Clock::time_point::min();
  Clock::duration queued_for{};  // waited for room so far (timeouts.queue), its attempts' time not counted
  boost::container::small_vector<std::shared_ptr<discovery::Backend>, 2> granted;

  // An exchange still running at a sweep gets its client watched (see watch_client).
  void on_slow() override;

  // A streamed response has begun: the request will not be retried, so its bytes can go. An
  // open SSE stream then holds no request memory (10,000 of them must fit in 64 MiB).
  void release_request() {
    if (request_released || buffer.size() != request_size) return;  // pipelined bytes stay
    labels.reserve(method.size() + target.size());
    labels.assign(method);
    labels.append(target);
    method = std::string_view(labels).substr(0, method.size());
    target = std::string_view(labels).substr(method.size());
    buffer.clear();
    buffer.release();
    chunked_body = std::string();
    upstream_head = std::string();
    head.fields = {};
    body = {};
    body_memory.release();
    request_size = 0;
    request_released = true;
  }
};

void append_hex(std::string& out, std::uint64_t v, int min_digits) {
  char buf[16];
  int n = 0;
  do {
    buf[n++] = "0123456789abcdef"[v & 0xf];
    v >>= 4;
  } while (v != 0 || n < min_digits);
  while (n > 0) out += buf[--n];
}

// "ig-<worker>-<random>-<counter>": unique across workers and restarts, built without printf.
void make_request_id(Worker& w, std::string& out) {
  out.assign(w.request_id_prefix);
  append_hex(out, ++w.request_counter, 1);
}

// Whether `id` is one this worker gave a request: its prefix and a counter, nothing else (an
// echo a proxy changed, `<id>/0` or `<id>, <id>`, is not taken for another request's).
bool is_request_id_of(const Worker& w, std::string_view id) {
  if (!id.starts_with(w.request_id_prefix) || id.size() == w.request_id_prefix.size()) return false;
  const auto counter = id.substr(w.request_id_prefix.size());
  return std::all_of(counter.begin(), counter.end(), [](char ch) { return std::isxdigit(static_cast<unsigned char>(ch)); });
}

// The reason phrase for a status the backend gave none for: empty when it is no status Beast
// knows (an empty reason is valid; a made-up one is not).
std::string_view reason_phrase(unsigned status) {
  const auto known = http::obsolete_reason(static_cast<http::status>(status));
  const std::string_view phrase(known.data(), known.size());
  return phrase.starts_with('<') ? std::string_view() : phrase;
}

// Ends a client connection: an orderly close, or a reset when the response was cut short and
// only the close would have ended it (a reset is the one way to say "incomplete" then).
void close_client(tcp::socket& socket, bool reset) {
  beast::error_code ignored;
  if (reset) {
    socket.set_option(net::socket_base::linger(true, 0), ignored);
  } else {
    socket.shutdown(tcp::socket::shutdown_send, ignored);
  }
  socket.close(ignored);
}

// Whether the client has sent bytes the gateway has not read (a pipelined request): closing
// then makes the kernel reset the connection, which throws away the end of the response not yet
// sent, and the client sees a clean end at a cut body. Such a close lingers (linger_close).
bool unread_from_client(tcp::socket& socket) {
  int unread = 0;
  return socket.is_open() && ::ioctl(socket.native_handle(), FIONREAD, &unread) == 0 && unread > 0;
}

void append_status_line(std::string& out, unsigned version_minor, unsigned status, std::string_view reason) {
  out += version_minor >= 1 ? "HTTP/1.1 " : "HTTP/1.0 ";
  out += http1::Decimal(status).view();
  out += ' ';
  out += reason.empty() ? reason_phrase(status) : reason;
  out += kCrlf;
}

void append_field(std::string& out, std::string_view name, std::string_view value) {
  out += name;
  out += ": ";
  out += value;
  out += kCrlf;
}

// Bytes up to this size are copied behind a head so that head and body leave in one buffer:
// Asio sends a single buffer with send(2), several with sendmsg(2), which costs the kernel more
// per call than the copy (perf: sendmsg 62% of the gateway's CPU against HAProxy's sendto 58%).
constexpr std::size_t kCoalesceMax = 16 * 1024;

// Writes every byte. `timeout` bounds each wait for progress (the peer taking any of the bytes),
// not the whole write: a 64 MiB request body to a backend that reads it steadily but slowly is
// not cut while it moves. (Relayed responses go out in pieces of at most one upstream read.) One send(2) in the usual case, as
// before: the loop only turns again for a write the socket could not take whole. `Rest` is a
// single buffer (sent with send(2), cheaper than sendmsg(2)) or a buffers_suffix.
template <typename Rest>
net::awaitable<beast::error_code> write_progressing(TimedSocket& sock, Rest rest, std::chrono::milliseconds timeout) {
  while (beast::buffer_bytes(rest) > 0) {
    sock.arm(timeout);
    auto [ec, n] = co_await sock.socket().async_write_some(rest, kDirect);
    if (auto settled = sock.settle(ec)) co_return settled;
    if constexpr (std::is_same_v<Rest, net::const_buffer>) rest += n;
    else rest.consume(n);
  }
  co_return beast::error_code{};
}

net::awaitable<beast::error_code> write_all(TimedSocket& sock, net::const_buffer bytes,
                                            std::chrono::milliseconds timeout) {
  return write_progressing(sock, bytes, timeout);
}

net::awaitable<beast::error_code> write_all(TimedSocket& sock, std::span<const net::const_buffer> pieces,
                                            std::chrono::milliseconds timeout) {
  return write_progressing(sock, beast::buffers_suffix<std::span<const net::const_buffer>>(pieces), timeout);
}

constexpr auto kLocalWriteTimeout = std::chrono::seconds(30);

// Writes an answer the gateway makes itself. Returns whether the connection may carry on.
net::awaitable<bool> write_local(ClientConnection* c, LocalResponse response, unsigned version_minor,
                                 bool keep_alive, bool head_only, std::string_view request_id) {
  keep_alive = keep_alive && !c->stopping->load(std::memory_order_relaxed);
  auto& out = c->response_head;
  out.clear();
  append_status_line(out, version_minor, response.status, {});
  append_field(out, "Server", "infergate");
  append_field(out, "Content-Type", response.content_type);
  if (!request_id.empty()) append_field(out, "X-Request-ID", request_id);
  for (const auto& [name, value] : response.headers) append_field(out, name, value);
  append_field(out, "Content-Length", http1::Decimal(response.body.size()).view());
  if (!keep_alive && version_minor >= 1) append_field(out, "Connection", "close");
  if (keep_alive && version_minor == 0) append_field(out, "Connection", "keep-alive");
  out += kCrlf;
  if (!head_only) out += response.body;  // the gateway's own answers are small
  auto ec = co_await write_all(c->sock, net::buffer(out), kLocalWriteTimeout);
  co_return !ec && keep_alive;
}

net::awaitable<bool> write_local_counted(GatewayState* state, ClientConnection* c, LocalResponse response,
                                         unsigned version_minor, bool keep_alive, bool head_only,
                                         std::string_view request_id) {
  state->count_response(response.status);
  co_return co_await write_local(c, std::move(response), version_minor, keep_alive, head_only, request_id);
}

// What happened to one attempt at one backend.
struct AttemptOutcome {
  // kHandedOff: a StreamRelay carries on with the response and reports it when it ends.
  enum Kind { kServed, kFailed, kClientGone, kBrokenMidResponse, kHandedOff } kind = kFailed;
  bool keep_alive = false;     // kServed: the client connection may serve another request
  bool timed_out = false;      // kFailed: a timeout (504 if it was the last try)
  std::string error;           // kFailed: why, for the final error message and logs
  bool over_total = false;     // ended by timeouts.total: no further try, nothing against the backend
  unsigned status = 0;
  std::uint64_t bytes = 0;
  std::chrono::seconds retry_after{0};  // kFailed on a 503: the backend's Retry-After, if it sent one
  bool failure_reported = false;  // the passive-health failure went in before the response was relayed
  // The backend's stats.failures_reported when the response head came: a success reported at
  // the end must not erase failures reported since (HealthChecker::report).
  std::uint64_t failures_at_head = discovery::HealthChecker::kNoSnapshot;
  bool after_sent = false;  // kFailed: the backend had the whole request and did not answer
  bool client_stalled = false;  // kClientGone: the client was there but took nothing within timeouts.idle
};

// The access log's note on a response not delivered whole: by its client's doing, by the
// backend's (the client got a broken response: it must not read as a whole one), or cut by the
// gateway (timeouts.total, the shutdown's deadline).
std::string_view end_note(const AttemptOutcome& out, bool shutdown_cut) {
  if (out.kind == AttemptOutcome::kClientGone) return out.client_stalled ? " client-stalled" : " client-gone";
  if (out.kind == AttemptOutcome::kBrokenMidResponse) return out.over_total || shutdown_cut ? " cut" : " backend-broke";
  return "";
}

AttemptOutcome client_gone_outcome() {
  AttemptOutcome out;
  out.kind = AttemptOutcome::kClientGone;
  return out;
}

AttemptOutcome over_total_outcome(const config::Config& cfg) {
  AttemptOutcome out;
  out.error = "no complete response within timeouts.total (" + std::to_string(cfg.timeouts.total.count()) + "ms)";
  out.timed_out = true;
  out.over_total = true;
  return out;
}

// What a parked connection that failed before any answer shows of the request, to tell a
// connection the backend had closed while it was parked (the request can go again on a new one:
// it cannot be delivered twice) from a backend that read the request and then closed (a crash
// on that prompt: an ordinary failed attempt).
enum class RequestFate {
  kNotTaken,      // reset as the request was written (it met a closed socket), end of stream
                  // and then a reset (the server had closed, and the request it did not read drew
                  // the reset), or end of stream with request bytes unacknowledged (the server
                  // had closed before they came; the reset they draw is on its way)
  kAcknowledged,  // end of stream after every byte was acknowledged: read by the server, unless
                  // the reset of a close with the request unread is still to come (a server that
                  // shuts down its side first, then closes)
  kUnknown,       // anything else (a timeout, a closed socket; and, when the request must not be
                  // sent twice, a reset with no end of stream before it once the request was out)
};

int tcp_state(tcp::socket& socket) {
  tcp_info info{};
  socklen_t size = sizeof info;
  return ::getsockopt(socket.native_handle(), IPPROTO_TCP, TCP_INFO, &info, &size) == 0 ? info.tcpi_state : -1;
}

// `sent_once`: the request went out whole and must not reach the backend twice
// (retries.after_sent false).
RequestFate request_fate(tcp::socket& socket, const beast::error_code& ec, bool sent_once) {
  if (ec == net::error::connection_reset || ec == net::error::broken_pipe) {
    // A reset alone, after the request went out, is most often a server that closed the parked
    // connection for idleness as the request arrived, with it unread (uvicorn stops reading at
    // once and closes a loop pass later: the unread request draws the reset, no end of stream
    // first). But a server that read the request and aborted the connection looks the same: a
    // request that must not be sent twice is not.
    return sent_once ? RequestFate::kUnknown : RequestFate::kNotTaken;
  }
  if (ec != net::error::eof || !socket.is_open()) return RequestFate::kUnknown;
  if (tcp_state(socket) == TCP_CLOSE) return RequestFate::kNotTaken;  // a reset came after the end of stream
  int unacknowledged = 0;
  if (::ioctl(socket.native_handle(), SIOCOUTQ, &unacknowledged) == 0 && unacknowledged > 0) return RequestFate::kNotTaken;
  return RequestFate::kAcknowledged;
}

// How long an end of stream with the request acknowledged waits for the reset that says the
// server closed without reading it: a server shutting down its side and then closing does both
// at once, so the reset follows within a scheduling delay; one that read the request sends none.
constexpr auto kResetWait = std::chrono::milliseconds(10);

// Whether a parked connection failed because the backend had closed it before taking the
// request (only on that rare path: the wait for a reset is a coroutine of its own, out of the
// attempt's frame).
net::awaitable<bool> stale_connection(tcp::socket* socket, beast::error_code ec, bool sent_once) {
  const auto fate = request_fate(*socket, ec, sent_once);
  if (fate != RequestFate::kAcknowledged) co_return fate == RequestFate::kNotTaken;
  net::steady_timer timer(socket->get_executor());
  for (auto waited = std::chrono::milliseconds(0); waited < kResetWait; waited += std::chrono::milliseconds(1)) {
    timer.expires_after(std::chrono::milliseconds(1));
    co_await timer.async_wait(kTuple);
    if (!socket->is_open()) co_return false;
    if (tcp_state(*socket) == TCP_CLOSE) co_return true;
  }
  co_return false;
}

bool is_out_of_descriptors(const beast::error_code& ec) {
  return ec == net::error::no_descriptors || ec == boost::system::errc::too_many_files_open_in_system;
}

net::awaitable<beast::error_code> connect_upstream(Worker* w, const discovery::Backend* backend,
                                                   TimedSocket& sock) {
  const auto& info = backend->info();
  auto it = w->resolved.find(backend->index());
  if (it == w->resolved.end()) {
    // Within timeouts.connect, like the connect itself: a DNS server that does not answer is a
    // failed attempt (retried elsewhere), not a request that waits on it. Nor past the socket's
    // cap (timeouts.total), which bounds every step of the exchange.
    // Nor past a shutdown's deadline, which ends the wait (as the lookup's timer is listed in
    // `waits`) or refuses to start one.
    if (w->state->shutdown_cut.load(std::memory_order_relaxed)) co_return beast::error_code(net::error::operation_aborted);
    auto [rec, results] = co_await discovery::resolve_by(
        w->io.get_executor(), info.host, std::to_string(info.port),
        std::min(coarse_now() + std::chrono::duration_cast<Clock::duration>(w->state->config.timeouts.connect),
                 sock.cap()),
        &w->waits);
    if (rec == beast::error::timeout && !w->state->shutdown_cut.load(std::memory_order_relaxed)) {
      spdlog::warn("DNS lookup of {} did not finish within timeouts.connect ({}ms)", info.host,
                   w->state->config.timeouts.connect.count());
    }
    if (rec) co_return rec;  // a timeout is reported as a connect timeout
    std::vector<tcp::endpoint> endpoints;
    for (const auto& r : results) endpoints.push_back(r.endpoint());
    it = w->resolved.emplace(backend->index(), std::move(endpoints)).first;
  }
  // A copy: other requests on this worker may add to or erase from `resolved` while this one
  // waits, which would leave `it` dangling for the second try below.
  const std::vector<tcp::endpoint> endpoints = it->second;
  sock.arm(w->state->config.timeouts.connect);
  auto [cec, ep] = co_await net::async_connect(sock.socket(), endpoints, kTuple);
  auto ec = sock.settle(cec);
  if (is_out_of_descriptors(ec) && w->pool.idle_count() > 0) {
    // Idle pooled connections are the descriptors this request can have: close them and try
    // once more rather than fail a request the gateway can serve.
    spdlog::debug("out of descriptors connecting to {}; closing {} idle pooled connection(s)", info.id,
                  w->pool.idle_count());
    w->pool.clear();
    sock.arm(w->state->config.timeouts.connect);
    auto [again, ep2] = co_await net::async_connect(sock.socket(), endpoints, kTuple);
    ec = sock.settle(again);
  }
  if (ec) {
    w->resolved.erase(backend->index());  // the address may have moved; resolve afresh next time
    co_return ec;
  }
  beast::error_code ignored;
  sock.socket().set_option(tcp::no_delay(true), ignored);
  co_return beast::error_code{};
}

// The request as a backend gets it: hop-by-hop fields dropped, X-Request-ID and
// X-Forwarded-For set, the body re-framed with Content-Length (a chunked body was de-chunked).
void build_upstream_head(const ClientConnection& c, std::string_view request_id, std::string_view host,
                         std::string_view via, std::string& out) {
  const auto& h = c.head;
  out.clear();
  out += h.method;
  out += ' ';
  out += h.target;
  out += " HTTP/1.1\r\n";
  std::string_view forwarded;
  std::string forwarded_list;  // several X-Forwarded-For fields make one list (RFC 9110 5.3)
  bool has_host = false;
  for (const auto& f : h.fields) {
    if (http1::is_hop_by_hop(f.name, h.connection_options)) continue;
    switch (f.name.size()) {
      case 4:
        if (iequals(f.name, "host")) has_host = true;
        break;
      case 6:
        if (iequals(f.name, "expect")) continue;  // the gateway already has the whole body
        break;
      case 12:
        if (iequals(f.name, "x-request-id")) continue;
        break;
      case 14:
        if (iequals(f.name, "content-length")) continue;
        break;
      case 15:
        if (iequals(f.name, "x-forwarded-for")) {
          if (forwarded.empty()) {
            forwarded = f.value;
          } else if (!f.value.empty()) {
            if (forwarded_list.empty()) forwarded_list.assign(forwarded);
            forwarded_list.append(", ").append(f.value);
            forwarded = forwarded_list;
          }
          continue;
        }
        break;
      case 17:
        if (iequals(f.name, "transfer-encoding")) continue;
        break;
      default:
        break;
    }
    append_field(out, f.name, f.value);
  }
  if (!has_host) append_field(out, "Host", host);  // HTTP/1.1 servers require one
  append_field(out, "Via", via);                   // after any the request came with
  append_field(out, "X-Request-ID", request_id);
  out += "X-Forwarded-For: ";
  if (!forwarded.empty()) {
    out += forwarded;
    out += ", ";
  }
  out += c.client_ip;
  out += kCrlf;
  if (h.content_length || h.chunked || !c.body.empty()) {
    append_field(out, "Content-Length", http1::Decimal(c.body.size()).view());
  }
  out += kCrlf;
}

// Where a relayed body's content goes to be scanned for `usage` (without chunked framing).
http1::BodyFramer::ContentSink usage_sink(UsageScanner& usage) {
  return {[](void* scanner, std::string_view content) { static_cast<UsageScanner*>(scanner)->feed(content); }, &usage};
}

void add_token_usage(discovery::Backend& backend, const UsageScanner& usage) {
  if (auto n = usage.prompt_tokens()) backend.stats.prompt_tokens.fetch_add(*n, std::memory_order_relaxed);
  if (auto n = usage.completion_tokens()) backend.stats.completion_tokens.fetch_add(*n, std::memory_order_relaxed);
}

// What a relay needs to know about the response whose head it forwards.
struct RelayPlan {
  http1::BodyFramer framer{http1::BodyFramer::Kind::kNone, 0, false};
  bool streamed = false;
  bool keep_alive = false;           // the client's connection
  bool upstream_keep_alive = false;
  // The client's body ends when its connection closes (an HTTP/1.0 client, a backend body ended
  // by its close): a response cut short must then reset the connection, or it looks complete.
  bool close_delimited = false;
};

// Relays the response (its head is parsed in `up->head`) and then body bytes as they arrive:
// SSE events are never held. Bytes pass through unchanged, chunk framing included; only an
// HTTP/1.0 client gets a chunked body de-chunked. An SSE stream is handed to a StreamRelay once
// its head is out (see there).
net::awaitable<AttemptOutcome> relay_response(Worker* w, ClientConnection* c, UpstreamConnection* up,
                                              bool head_request, std::string_view request_id,
                                              discovery::Backend* backend, Clock::time_point started,
                                              bool* upstream_reusable, std::shared_ptr<StreamRelay>* handoff);

AttemptOutcome failed_outcome(std::string error, bool timed_out = false, unsigned status = 0) {
  AttemptOutcome out;
  out.error = std::move(error);
  out.timed_out = timed_out;
  out.status = status;
  return out;
}

// The outcomes below are built by plain functions, not in the coroutines that return them: a
// coroutine frame keeps a slot for every local of every branch, and Asio recycles frames only up
// to about 1 KiB (larger ones are a malloc/free pair per request, and each evicts a cached
// smaller frame).

// The backend had the whole request and answered with something that cannot be relayed (a
// malformed head, one over limits.max_header, a protocol switch): it may have acted on the
// request, so it is not sent elsewhere when retries.after_sent is false.
AttemptOutcome sent_but_unusable_outcome(std::string error, bool request_sent) {
  auto out = failed_outcome(std::move(error));
  out.after_sent = request_sent;  // false for an early answer to an upload the backend cut short
  return out;
}

AttemptOutcome connect_failed_outcome(const beast::error_code& ec, bool client_gone, std::chrono::milliseconds limit) {
  auto out = failed_outcome(ec == beast::error::timeout
                                ? "no connection within timeouts.connect (" + std::to_string(limit.count()) + "ms)"
                                : "connect: " + ec.message(),
                            ec == beast::error::timeout);
  if (client_gone) out.kind = AttemptOutcome::kClientGone;
  return out;
}

// A retryable status (502/503): the connection closes; a 503's Retry-After is kept.
AttemptOutcome retryable_status_outcome(unsigned status, std::string_view retry_after) {
  auto out = failed_outcome("HTTP " + std::to_string(status), false, status);
  out.retry_after = RetryPolicy::retry_after(retry_after);
  return out;
}

// The exchange failed before a response head arrived (`request_sent`: after the whole request
// went out).
AttemptOutcome unanswered_outcome(const beast::error_code& ec, bool request_sent, const config::Config& cfg) {
  const bool timed_out = ec == beast::error::timeout;
  std::string why = ec == net::error::eof                ? "the backend closed the connection without answering"
                    : ec == net::error::connection_reset ? "the backend reset the connection without answering"
                                                          : ec.message();
  if (timed_out) {
    why = request_sent ? "no response within timeouts.first_byte (" + std::to_string(cfg.timeouts.first_byte.count()) + "ms)"
                       : "the backend took no more request bytes for timeouts.idle (" +
                             std::to_string(cfg.timeouts.idle.count()) + "ms)";
  }
  auto out = failed_outcome(std::move(why), timed_out);
  out.after_sent = request_sent;
  return out;
}

// An upload the backend cut short (reset, broken pipe) may have been answered first: a server
// that refuses a request from its head alone (a body limit: 413) answers and closes with the
// body unread, and the kernel resets the connection. What it sent before the reset is still in
// the socket: read it, without waiting, up to `limit` bytes. Returns whether any bytes came.
bool read_early_answer(UpstreamConnection& conn, std::size_t limit) {
  auto& socket = conn.sock.socket();
  if (!socket.is_open()) return false;
  bool any = false;
  while (conn.buffer.size() < limit) {
    auto [room_ptr, room] = conn.buffer.prepare(kUpstreamRead);
    const auto n = ::recv(socket.native_handle(), room_ptr, room, MSG_DONTWAIT);
    if (n <= 0) break;
    conn.buffer.commit(static_cast<std::size_t>(n));
    any = true;
  }
  return any;
}

AttemptOutcome handed_off_outcome() {
  AttemptOutcome out;
  out.kind = AttemptOutcome::kHandedOff;
  return out;
}

// One try at one backend: connection (pooled or new), request out, response back. A pooled
// connection the backend had closed is replaced by a fresh one once, invisibly.
net::awaitable<AttemptOutcome> run_attempt(Worker* w, discovery::Backend* backend, ClientConnection* c,
                                           std::string_view request_id, Clock::time_point started,
                                           std::shared_ptr<StreamRelay>* handoff) {
  const auto& cfg = w->state->config;
  auto& watch = *c->watch;
  bool fresh_retry_used = false;
  for (;;) {
    // The replacement for a stale connection is a new one: the pool's other parked connections
    // were likely closed by the same cause (the backend's idle timeout, a restart).
    auto conn = fresh_retry_used ? nullptr : w->pool.acquire(backend->index());
    const bool reused = conn != nullptr;
    if (!conn) {
      conn = std::make_unique<UpstreamConnection>(w->deadlines, w->io.get_executor());
      conn->sock.cap_at(c->total_deadline);
      watch.connection = conn.get();
      auto ec = co_await connect_upstream(w, backend, conn->sock);
      watch.connection = nullptr;
      if (ec) {
        if (ec == beast::error::timeout && conn->sock.past_cap()) co_return over_total_outcome(cfg);
        co_return connect_failed_outcome(ec, watch.client_gone, cfg.timeouts.connect);
      }
      // A client that left during the name lookup found no socket to close: the request must
      // not go out now, to be generated for nobody.
      if (watch.client_gone) co_return client_gone_outcome();
    }
    conn->sock.cap_at(c->total_deadline);
    watch.connection = conn.get();
    // Past the shutdown's deadline no request goes out (a connect or lookup may end in its grace).
    if (w->state->shutdown_cut.load(std::memory_order_relaxed)) {
      watch.connection = nullptr;
      co_return failed_outcome("the gateway is shutting down");
    }

    // The head is built once per request (retries reuse it); head and body go out in one
    // gather write.
    if (c->upstream_head.empty()) {
      build_upstream_head(*c, request_id, backend->info().id, w->state->via, c->upstream_head);
      c->upstream_head_size = c->upstream_head.size();
      if (c->body.size() <= kCoalesceMax) c->upstream_head += c->body;  // one buffer, one send(2)
    }
    const bool coalesced = c->upstream_head.size() != c->upstream_head_size || c->body.empty();
    std::array<net::const_buffer, 2> request_bytes{net::buffer(c->upstream_head),
                                                   net::buffer(c->body.data(), coalesced ? 0 : c->body.size())};
    // An if, not a conditional expression: GCC 12 miscompiles co_await inside one (nested in
    // an experiment, it sent each request twice).
    beast::error_code wec;
    if (coalesced) {
      wec = co_await write_all(conn->sock, request_bytes[0], cfg.timeouts.idle);
    } else {
      wec = co_await write_all(conn->sock, request_bytes, cfg.timeouts.idle);
    }
    const auto sent_at = coarse_now();
    const bool request_sent = !wec;
    // The backend's answer to a request it would not take whole is relayed like any other, on a
    // connection that is not kept.
    const bool answered_early = wec && wec != beast::error::timeout && !watch.client_gone &&
                                read_early_answer(*conn, cfg.limits.max_header);
    if (answered_early) wec = {};
    if (!wec) {
      // The whole head must arrive within timeouts.first_byte; interim (1xx) answers are skipped.
      const auto deadline = sent_at + cfg.timeouts.first_byte;
      for (;;) {
        auto parsed = http1::parse_response(conn->buffer.data(), cfg.limits.max_header, conn->head);
        if (parsed == http1::Parse::kComplete && conn->head.status >= 100 && conn->head.status < 200 &&
            conn->head.status != 101) {
          conn->buffer.consume(conn->head.size);
          continue;
        }
        if (parsed == http1::Parse::kBad || parsed == http1::Parse::kTooLarge) {
          watch.connection = nullptr;
          co_return sent_but_unusable_outcome(parsed == http1::Parse::kBad
                                                  ? "malformed response head: " + std::string(conn->head.error)
                                                  : "response head exceeds limits.max_header",
                                              request_sent);
        }
        if (parsed == http1::Parse::kComplete) break;
        auto [room_ptr, room] = conn->buffer.prepare(kUpstreamRead);
        conn->sock.arm_at(deadline);
        auto [rec, n] = co_await conn->sock.socket().async_read_some(net::buffer(room_ptr, room), kDirect);
        wec = conn->sock.settle(rec);
        if (wec) break;
        conn->buffer.commit(n);
      }
      if (!wec) {
        const auto status = conn->head.status;
        if (status == 408 && reused && !fresh_retry_used && !conn->head.keep_alive() &&
            coarse_now() - sent_at < kStaleConnectionWindow) {
          // A 408 on a parked connection, at once and closing it: the backend closed it for
          // idleness as the request came (servers say so as they close), so it answers no
          // request. Like a stale connection: tried again, once, on a fresh one. A 408 that took
          // longer, or keeps the connection, is the backend's answer to this request, relayed.
          watch.connection = nullptr;
          fresh_retry_used = true;
          backend->stats.resends.fetch_add(1, std::memory_order_relaxed);
          w->pool.clear(backend->index());
          continue;
        }
        if (status == 101) {
          watch.connection = nullptr;
          auto out = sent_but_unusable_outcome("the backend switched protocols, which the gateway does not relay",
                                               request_sent);
          out.status = 502;
          co_return out;
        }
        if (RetryPolicy::is_retryable_status(status)) {
          watch.connection = nullptr;
          co_return retryable_status_outcome(status, conn->head.find("Retry-After"));
        }
        bool reusable = false;
        auto out = co_await relay_response(w, c, conn.get(), c->method == "HEAD", request_id, backend,
                                           started, &reusable, handoff);
        watch.connection = nullptr;
        if (!request_sent) out.after_sent = false;  // an early answer: the backend did not take it whole
        if (out.kind == AttemptOutcome::kHandedOff) {
          adopt_upstream(**handoff, std::move(conn));
          co_return out;
        }
        if (out.kind == AttemptOutcome::kServed && reusable && !answered_early && !watch.client_gone) {
          w->pool.release(backend->index(), std::move(conn));
        }
        co_return out;
      }
    }
    watch.connection = nullptr;
    if (watch.client_gone) co_return client_gone_outcome();
    // A parked connection the backend had closed fails at once, with nothing of a response
    // read and the request not taken: not the backend's fault, so it is tried again on a fresh
    // connection. A backend that read the request and closed (a crash on it), however soon, or
    // that closes later, has an ordinary failed attempt, counted and retried elsewhere (or not,
    // with retries.after_sent false), never a silent re-send.
    const bool sent_once = request_sent && !cfg.retries.after_sent;
    if (reused && !fresh_retry_used && conn->buffer.size() == 0 && coarse_now() - sent_at < kStaleConnectionWindow &&
        co_await stale_connection(&conn->sock.socket(), wec, sent_once)) {
      spdlog::debug("{} backend {}: the parked connection was closed before it took the request ({}); sending it on "
                    "a new connection", request_id, backend->info().id, wec.message());
      fresh_retry_used = true;
      backend->stats.resends.fetch_add(1, std::memory_order_relaxed);
      w->pool.clear(backend->index());
      continue;
    }
    // The backend's other parked connections were likely closed by the same cause (an idle
    // timeout, a restart): each would fail a request of its own.
    if (reused && (wec == net::error::connection_reset || wec == net::error::eof)) w->pool.clear(backend->index());
    if (wec == beast::error::timeout && conn->sock.past_cap()) co_return over_total_outcome(cfg);
    co_return unanswered_outcome(wec, request_sent, cfg);
  }
}

// Watches the client while an attempt runs: a one-byte peek, pending until the socket becomes
// readable. If the client went away, the upstream exchange is aborted so
// the backend stops generating for nobody. Pipelined bytes just end the watch (the client is
// alive); they stay in the socket for the next request.
void watch_client(tcp::socket& client, const std::shared_ptr<ClientWatch>& watch) {
  const auto generation = watch->generation;
  client.async_receive(net::buffer(&watch->byte, 1), tcp::socket::message_peek,
                       [watch, generation](const beast::error_code& ec, std::size_t n) {
                         if (watch->generation != generation || !watch->active) return;
                         if (ec == net::error::operation_aborted || (!ec && n > 0)) return;
                         watch->client_gone = true;
                         if (watch->connection != nullptr) {
                           beast::error_code ignored;
                           auto& s = watch->connection->sock.socket();
                           s.shutdown(tcp::socket::shutdown_both, ignored);
                           s.close(ignored);
                         }
                       });
}

void ClientConnection::on_slow() {
  if (!watch || !watch->active || watching) return;
  watching = true;
  spdlog::trace("watching the client of a request that outlived a deadline sweep");
  watch_client(sock.socket(), watch);
}

struct InflightGuard {
  explicit InflightGuard(std::atomic<std::int64_t>& c) : counter(c) { counter.fetch_add(1, std::memory_order_relaxed); }
  ~InflightGuard() { counter.fetch_sub(1, std::memory_order_relaxed); }
  InflightGuard(const InflightGuard&) = delete;
  InflightGuard& operator=(const InflightGuard&) = delete;
  std::atomic<std::int64_t>& counter;
};

// Per-backend counters and passive health for one attempt's outcome.
void record_attempt(GatewayState& state, discovery::Backend& backend, const AttemptOutcome& out,
                    Clock::time_point started) {
  // What breaks once the shutdown's deadline ended every wait says nothing about the backend.
  if (out.kind != AttemptOutcome::kServed && state.shutdown_cut.load(std::memory_order_relaxed)) return;
  if (out.over_total || out.kind == AttemptOutcome::kClientGone) {
    // Cut by the gateway's own limit (timeouts.total) or left by its client: nothing against the
    // backend, but a response that was flowing when it ended shows the backend working (users
    // stop streams routinely; without this, failures either side of such streams would count as
    // consecutive).
    if (out.bytes > 0 && !out.failure_reported && state.health != nullptr) {
      state.health->report(backend.shared_from_this(), false, out.failures_at_head);
    }
    return;
  }
  auto& st = backend.stats;
  bool failed = false;
  switch (out.kind) {
    case AttemptOutcome::kServed:
      if (out.status >= 500) {
        st.responses_5xx.fetch_add(1, std::memory_order_relaxed);
        failed = true;
      } else if (out.status >= 400) {
        st.responses_4xx.fetch_add(1, std::memory_order_relaxed);  // the client's fault
      } else {
        st.responses_2xx.fetch_add(1, std::memory_order_relaxed);
      }
      st.duration.observe(Clock::now() - started);
      break;
    case AttemptOutcome::kFailed:
      (out.status != 0 ? st.responses_5xx : st.errors).fetch_add(1, std::memory_order_relaxed);
      failed = true;
      break;
    case AttemptOutcome::kBrokenMidResponse:
      st.errors.fetch_add(1, std::memory_order_relaxed);
      failed = true;
      break;
    case AttemptOutcome::kClientGone:  // handled above
    case AttemptOutcome::kHandedOff:
      return;  // a handed-off stream is recorded when it ends
  }
  if (failed && !out.error.empty()) backend.set_last_error(out.error);
  // A 5xx was reported when its head came (before the client saw it); everything else now.
  if (state.health != nullptr && !out.failure_reported) {
    state.health->report(backend.shared_from_this(), failed, out.failures_at_head);
  }
}

// The rest of an SSE stream, relayed with plain completion handlers once its head is out: an
// open stream then holds this object, its two sockets and a small buffer, and no coroutine
// frames (10,000 streams in 64 MiB). It reports the exchange when it ends and hands a
// keep-alive client back to a new session.
// A lingering close, for a connection the gateway ends while the client has sent more (see
// unread_from_client): the gateway's side is shut (the client reads the whole response, then its
// end), and what the client sends is read and thrown away until it closes too, 2 s pass
// without a byte, 30 s pass, or the gateway stops. The connection keeps its slot meanwhile, and
// is counted in infergate_client_connections.
// Whatever has come when it ends is read before the close, so the close itself resets nothing
// (the kernel still sends what the gateway wrote after the process exits).
// One of the gateway port's client connections, counted in infergate_client_connections while
// held; null for metrics.listen scrapers, which are not counted. A lingering close takes it over.
class ConnectionCount {
 public:
  explicit ConnectionCount(std::atomic<std::int64_t>* count) : count_(count) {
    if (count_ != nullptr) count_->fetch_add(1, std::memory_order_relaxed);
  }
  ConnectionCount(ConnectionCount&& other) noexcept : count_(std::exchange(other.count_, nullptr)) {}
  ConnectionCount& operator=(ConnectionCount&&) = delete;
  ~ConnectionCount() {
    if (count_ != nullptr) count_->fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  std::atomic<std::int64_t>* count_;
};

net::awaitable<void> linger_close(Worker* w, tcp::socket socket, ConnectionSlot slot, ConnectionCount count) {
  constexpr auto kLingerTotal = std::chrono::seconds(30);
  constexpr auto kLingerQuiet = std::chrono::seconds(2);
  TimedSocket sock(w->deadlines, std::move(socket));
  beast::error_code ignored;
  sock.socket().shutdown(tcp::socket::shutdown_send, ignored);
  std::array<char, 4096> sink{};
  const auto deadline = coarse_now() + kLingerTotal;
  while (!w->state->stopping.load(std::memory_order_relaxed)) {
    sock.arm_at(std::min(deadline, coarse_now() + kLingerQuiet));
    sock.waiting_between_requests();  // a shutdown ends it, as an idle keep-alive wait
    auto [ec, n] = co_await sock.socket().async_read_some(net::buffer(sink), kTuple);
    if (sock.settle(ec)) break;
  }
  while (::recv(sock.socket().native_handle(), sink.data(), sink.size(), MSG_DONTWAIT) > 0) {
  }
  sock.close();
  (void)slot;  // given back now, and the connection no longer counted
  (void)count;
}

class StreamRelay : public std::enable_shared_from_this<StreamRelay> {
 public:
  StreamRelay(Worker* w, discovery::Backend* backend, RelayPlan plan, const ClientConnection& c,
              Clock::time_point started, AttemptOutcome progress, UsageScanner usage, bool first_body_byte,
              std::size_t read_room)
      : w_(w),
        backend_(backend->shared_from_this()),
        plan_(std::move(plan)),
        usage_(usage),
        started_(started),
        out_(std::move(progress)),
        request_id_(c.request_id),
        total_deadline_(c.total_deadline),
        request_started_(c.request_started),
        labels_(c.method),
        method_size_(c.method.size()),
        read_room_(read_room),
        first_body_byte_(first_body_byte) {
    labels_ += c.target;
    // The session's counts end with it; this relay holds its own until the stream ends.
    auto& state = *w_->state;
    state.inflight_requests.fetch_add(1, std::memory_order_relaxed);
    state.client_connections.fetch_add(1, std::memory_order_relaxed);
    backend_->stats.inflight.fetch_add(1, std::memory_order_relaxed);
  }
  ~StreamRelay() { release_counts(); }
  StreamRelay(const StreamRelay&) = delete;
  StreamRelay& operator=(const StreamRelay&) = delete;

  void adopt(std::unique_ptr<UpstreamConnection> up) {
    up_ = std::move(up);
    up_->sock.cap_at(total_deadline_);
    up_->head.fields = {};  // the head is out; an idle stream keeps no copy of its fields
  }

  // The client went away while the stream was being handed over (the session's watch saw it
  // and closed the backend connection): the relay ends as the client's doing, not as a
  // backend failure (its first read finds the closed socket).
  void client_left() { client_gone_ = true; }
  // The request's retries before this attempt, for the access log.
  void set_retries(int retries) { retries_ = retries; }

  void start(tcp::socket client, ConnectionSlot slot) {
    client_.emplace(w_->deadlines, std::move(client));
    client_->cap_at(total_deadline_);
    slot_ = std::move(slot);
    watch_client();
    relay_buffered();
  }

 private:
  void read_upstream() {
    if (up_->buffer.size() == 0 && read_room_ < kStreamRelayMax && up_->buffer.capacity() >= read_room_ * 2) {
      read_room_ = std::min(kStreamRelayMax, up_->buffer.capacity());
    }
    auto [room_ptr, room] = up_->buffer.prepare(read_room_);
    last_room_ = room;
    up_->sock.arm(w_->state->config.timeouts.idle);
    up_->sock.socket().async_read_some(net::buffer(room_ptr, room),
                                       [self = shared_from_this()](beast::error_code ec, std::size_t n) {
                                         self->on_upstream_read(ec, n);
                                       });
  }

  void on_upstream_read(beast::error_code ec, std::size_t n) {
    ec = up_->sock.settle(ec);
    if (client_gone_) return finish(AttemptOutcome::kClientGone);
    if (ec == net::error::eof && plan_.framer.kind() == http1::BodyFramer::Kind::kUntilClose) {
      plan_.framer.end_of_stream();
      return relay_buffered();
    }
    if (ec == beast::error::timeout && up_->sock.past_cap()) {
      out_.over_total = true;
      return finish(AttemptOutcome::kBrokenMidResponse, "the stream outlasted timeouts.total");
    }
    if (ec) {
      return finish(AttemptOutcome::kBrokenMidResponse,
                    ec == beast::error::timeout ? "no bytes within timeouts.idle" : ec.message());
    }
    up_->buffer.commit(n);
    if (n == last_room_ && read_room_ < kStreamRelayMax) read_room_ = std::min(kStreamRelayMax, read_room_ * 2);
    relay_buffered();
  }

  // Forwards what the buffer holds of the body, then reads on (or ends).
  void relay_buffered() {
    const auto step = plan_.framer.step(up_->buffer.data(), usage_sink(usage_));
    if (step.bad) return finish(AttemptOutcome::kBrokenMidResponse, "malformed chunked body from the backend");
    pending_consume_ = step.consumed;
    last_ = step.last;
    if (step.payload.empty()) return after_write();
    out_.bytes += step.payload.size();
    if (first_body_byte_) {
      backend_->stats.ttft.observe(Clock::now() - started_);
      first_body_byte_ = false;
    }
    // An event is a few hundred bytes and the client's socket buffer almost always has room:
    // send it now, without a queued completion, so each event costs the thread one turn
    // through Asio's handler queue instead of two. A full buffer falls back to an async write.
    // (The session made the socket non-blocking.)
    beast::error_code ec;
    const auto rest = send_now(client_->socket(), net::buffer(step.payload.data(), step.payload.size()), ec);
    if (ec) return finish(AttemptOutcome::kClientGone);
    if (rest.size() == 0) return after_write();
    client_->arm(w_->state->config.timeouts.idle);
    net::async_write(client_->socket(), rest,
                     [self = shared_from_this()](beast::error_code wec, std::size_t) {
                       if (auto ec = self->client_->settle(wec)) {
                         if (ec == beast::error::timeout && self->client_->past_cap()) {
                           self->out_.over_total = true;  // the gateway's limit, not a slow client
                           return self->finish(AttemptOutcome::kBrokenMidResponse, "the stream outlasted timeouts.total");
                         }
                         self->out_.client_stalled = ec == beast::error::timeout;
                         return self->finish(AttemptOutcome::kClientGone);
                       }
                       self->after_write();
                     });
  }

  void after_write() {
    up_->buffer.consume(pending_consume_);
    if (last_) return finish(AttemptOutcome::kServed);
    read_upstream();
  }

  // A client that goes away mid-stream ends the upstream exchange: the backend stops generating.
  void watch_client() {
    client_->socket().async_receive(net::buffer(&peek_byte_, 1), tcp::socket::message_peek,
                                    [self = shared_from_this()](beast::error_code ec, std::size_t n) {
                                      if (self->finished_ || ec == net::error::operation_aborted || (!ec && n > 0)) {
                                        return;  // pipelined bytes: alive; they wait for the next session
                                      }
                                      self->client_gone_ = true;
                                      beast::error_code ignored;
                                      self->up_->sock.socket().shutdown(tcp::socket::shutdown_both, ignored);
                                      self->up_->sock.socket().close(ignored);
                                    });
  }

  void finish(AttemptOutcome::Kind kind, std::string error = {});

  void release_counts() {
    if (counts_released_) return;
    counts_released_ = true;
    auto& state = *w_->state;
    state.inflight_requests.fetch_sub(1, std::memory_order_relaxed);
    state.client_connections.fetch_sub(1, std::memory_order_relaxed);
    state.admission.give_back(*backend_);  // to a request queued for a place, if one waits
  }

  Worker* w_;
  std::shared_ptr<discovery::Backend> backend_;
  RelayPlan plan_;
  UsageScanner usage_;
  Clock::time_point started_;
  AttemptOutcome out_;
  std::string request_id_;
  Clock::time_point total_deadline_;
  Clock::time_point request_started_;
  std::string labels_;  // method then target, for the access log
  std::size_t method_size_;
  std::optional<TimedSocket> client_;
  ConnectionSlot slot_;  // the client connection's; passed on to the next session
  std::unique_ptr<UpstreamConnection> up_;
  std::size_t pending_consume_ = 0;
  std::size_t read_room_;
  std::size_t last_room_ = 0;
  bool first_body_byte_;
  bool last_ = false;
  bool client_gone_ = false;
  bool finished_ = false;
  bool counts_released_ = false;
  char peek_byte_ = 0;
  int retries_ = 0;
};

void StreamRelay::finish(AttemptOutcome::Kind kind, std::string error) {
  if (finished_) return;
  finished_ = true;
  auto& state = *w_->state;
  out_.kind = kind;
  out_.error = std::move(error);
  out_.keep_alive = kind == AttemptOutcome::kServed && plan_.keep_alive;
  record_attempt(state, *backend_, out_, started_);
  state.count_response(out_.status);
  const std::string_view method = std::string_view(labels_).substr(0, method_size_);
  const std::string_view target = std::string_view(labels_).substr(method_size_);
  if (kind == AttemptOutcome::kBrokenMidResponse && state.shutdown_cut.load(std::memory_order_relaxed)) {
    spdlog::warn("{} {} {}: cut on backend {} at the shutdown deadline (timeouts.shutdown)", request_id_, method,
                 target, backend_->info().id);
  } else if (kind == AttemptOutcome::kBrokenMidResponse && out_.over_total) {
    spdlog::warn("{} {} {}: cut on backend {}: {}", request_id_, method, target, backend_->info().id, out_.error);
  } else if (kind == AttemptOutcome::kBrokenMidResponse) {
    spdlog::warn("{} {} {}: backend {} broke the response after it started: {}", request_id_, method, target,
                 backend_->info().id, out_.error);
  }
  if (state.config.log.access) {
    auto ms = std::chrono::duration<double, std::milli>(Clock::now() - request_started_).count();
    spdlog::info("{} {} {} -> {} {} {}B {:.1f}ms retries={}{}", request_id_, method, target, backend_->info().id,
                 out_.status, out_.bytes, ms, retries_,
                 end_note(out_, state.shutdown_cut.load(std::memory_order_relaxed)));
  }
  if (kind == AttemptOutcome::kServed) {
    add_token_usage(*backend_, usage_);
    if (plan_.upstream_keep_alive && up_->buffer.size() == 0) w_->pool.release(backend_->index(), std::move(up_));
  }
  up_.reset();
  beast::error_code ignored;
  client_->socket().cancel(ignored);  // ends the watch
  if (out_.keep_alive && !state.stopping.load(std::memory_order_relaxed)) {
    net::co_spawn(w_->io,
                  run_client_session(w_, std::move(client_->socket()), Listener::kGateway, std::move(slot_), true),
                  net::detached);
  } else {
    // A close-delimited answer not sent whole (the backend broke it, or the client was too slow
    // to take it within timeouts.idle) ends with a reset: an orderly close would look complete.
    const bool cut = kind == AttemptOutcome::kBrokenMidResponse || kind == AttemptOutcome::kClientGone;
    // A whole answer lingers: the client's next request may be on its way even if none has come
    // yet (one arriving after the close would reset the connection just the same).
    if (kind == AttemptOutcome::kServed) {
      net::co_spawn(w_->io,
                    linger_close(w_, std::move(client_->socket()), std::move(slot_),
                                 ConnectionCount(&w_->state->client_connections)),
                    net::detached);
    } else {
      close_client(client_->socket(), cut && plan_.close_delimited);
    }
  }
  release_counts();
}

void adopt_upstream(StreamRelay& relay, std::unique_ptr<UpstreamConnection> up) { relay.adopt(std::move(up)); }

// A response that broke before anything of it reached the client: an ordinary failed attempt
// (retried, or 502/504), by a backend that had the whole request.
AttemptOutcome unstarted_response_outcome(AttemptOutcome out, bool timed_out) {
  out.kind = AttemptOutcome::kFailed;
  out.status = 0;  // its head was never relayed: not a response of that status
  out.timed_out = timed_out;
  out.after_sent = true;
  return out;
}

net::awaitable<AttemptOutcome> relay_response(Worker* w, ClientConnection* c, UpstreamConnection* up,
                                              bool head_request, std::string_view request_id,
                                              discovery::Backend* backend, Clock::time_point started,
                                              bool* upstream_reusable, std::shared_ptr<StreamRelay>* handoff) {
  AttemptOutcome out;
  const auto& rh = up->head;
  const unsigned client_minor = c->head.version_minor >= 1 ? 1 : 0;
  RelayPlan plan;
  plan.keep_alive = c->keep_alive();
  out.status = rh.status;
  // A 5xx counts against the backend before the client sees it: a client that sends its next
  // request on reading this one must find the ejection it may cause already decided. A success
  // counts only once the whole response is through (when the outcome is recorded): a head is no
  // proof, as a server that sends its head before the prefill (vLLM streams) and then dies,
  // stalls or breaks every response would otherwise reset its failure count with each head and
  // never be ejected.
  out.failures_at_head = backend->stats.failures_reported.load(std::memory_order_relaxed);
  if (w->state->health != nullptr && rh.status >= 500) {
    w->state->health->report(backend->shared_from_this(), true);
    out.failure_reported = true;
  }

  using Kind = http1::BodyFramer::Kind;
  Kind kind = Kind::kNone;
  if (head_request || rh.status == 204 || rh.status == 304) {
    kind = Kind::kNone;
  } else if (rh.chunked) {
    kind = Kind::kChunked;
  } else if (rh.content_length) {
    kind = Kind::kLength;
  } else {
    kind = Kind::kUntilClose;  // the body ends when the backend closes; so must the client's
    plan.keep_alive = false;
  }
  const bool dechunk = kind == Kind::kChunked && client_minor == 0;
  if (dechunk) plan.keep_alive = false;  // an HTTP/1.0 client gets the body raw, ended by the close
  plan.close_delimited = dechunk || kind == Kind::kUntilClose;
  plan.framer = http1::BodyFramer(kind, rh.content_length.value_or(0), dechunk);
  plan.streamed = rh.find("content-type").starts_with("text/event-stream");
  plan.upstream_keep_alive = rh.keep_alive() && kind != Kind::kUntilClose;

  auto& head = c->response_head;
  head.clear();
  append_status_line(head, client_minor, rh.status, rh.reason);
  bool has_id = false;
  bool length_sent = false;
  for (const auto& f : rh.fields) {
    if (http1::is_hop_by_hop(f.name, rh.connection_options)) {
      // Trailer announces the trailers of a chunked body, which go on to the client with it
      // (RFC 9110 6.6.2); dechunked for an HTTP/1.0 client, they are dropped, and so is it.
      if (kind != Kind::kChunked || dechunk || !iequals(f.name, "trailer")) continue;
    }
    // HTTP/1.0 has no Transfer-Encoding: its body is dechunked or there is none (HEAD, 204).
    if ((dechunk || client_minor == 0) && iequals(f.name, "transfer-encoding")) continue;
    // A 204 has no body and must not say otherwise (RFC 9110 8.6, RFC 9112 6.1).
    if (rh.status == 204 && (iequals(f.name, "content-length") || iequals(f.name, "transfer-encoding"))) continue;
    // Chunked framing wins over a Content-Length sent alongside (RFC 9112 6.3), and a message
    // must not carry both: the client would frame the body by whichever it trusts (also on an
    // answer without a body, to HEAD or a 304). Equal Content-Length fields (allowed in) go out
    // as one.
    if (iequals(f.name, "content-length")) {
      if (rh.chunked || length_sent) continue;
      length_sent = true;
    }
    if (!has_id && iequals(f.name, "x-request-id")) {
      // A backend that echoes the id shows which request it answers. Another id this worker
      // gave a request (however long ago), or a client's id answered before on this
      // connection, means the connection is out of step (the backend sent an answer nobody
      // asked for, which arrived late): this answer belongs to someone else and must not reach
      // this client. (A backend that makes up its own ids does not make up ours.) The error
      // does not quote the id: it was another client's.
      if (f.value != request_id && (is_request_id_of(*w, f.value) || up->sent_before(f.value))) {
        out.kind = AttemptOutcome::kFailed;
        out.status = 0;
        out.error = "the backend sent an answer to an earlier request on this connection again: the connection "
                    "was out of step";
        out.after_sent = true;  // it has this request, and its answer may be on the way
        *upstream_reusable = false;
        co_return out;
      }
      has_id = true;
    }
    append_field(head, f.name, f.value);
  }
  if (!has_id) append_field(head, "X-Request-ID", request_id);
  up->remember_sent(request_id);
  if (!plan.keep_alive && client_minor >= 1) append_field(head, "Connection", "close");
  if (plan.keep_alive && client_minor == 0) append_field(head, "Connection", "keep-alive");
  head += kCrlf;
  up->buffer.consume(rh.size);  // from here on `rh` must not be used: its views may move

  const auto idle = w->state->config.timeouts.idle;
  std::size_t read_room = plan.streamed ? kStreamRelay : kUpstreamRead;
  const std::size_t read_max = plan.streamed ? kStreamRelayMax : kRelayMax;
  if (plan.streamed && up->buffer.capacity() > kStreamRelay && up->buffer.size() <= kStreamRelay) {
    up->buffer.reallocate(kStreamRelay);
  }
  auto& usage = c->usage;
  usage = UsageScanner();
  bool head_sent = false;
  bool first_body_byte = true;
  for (;;) {
    const auto step = plan.framer.step(up->buffer.data(), usage_sink(usage));
    if (step.bad) {
      out.error = "malformed chunked body from the backend";
      *upstream_reusable = false;
      if (!head_sent) co_return unstarted_response_outcome(std::move(out), false);
      out.kind = AttemptOutcome::kBrokenMidResponse;
      c->reset_on_close = plan.close_delimited;
      co_return out;
    }
    // The head waits for the body's first bytes (a stream's first event): a backend that fails
    // before them (it died during the prefill, its first chunk is malformed) has an ordinary
    // failed attempt, retried elsewhere, instead of a stream cut before it began. The head and
    // the first piece then leave in one write.
    const bool hold_head = !head_sent && step.payload.empty() && !step.last;
    if (first_body_byte && !step.payload.empty()) {
      // Observed as it came from the backend, before the client can see it (or, with the head
      // held, all of a short stream at once).
      if (plan.streamed) backend->stats.ttft.observe(Clock::now() - started);
      first_body_byte = false;
    }
    if (!hold_head && (!head_sent || !step.payload.empty())) {
      // One buffer where possible (see kCoalesceMax): the head with a small first piece behind it.
      std::array<net::const_buffer, 2> pieces;
      std::size_t count = 0;
      if (!head_sent && step.payload.size() <= kCoalesceMax) {
        head += step.payload;
        pieces[count++] = net::buffer(head);
      } else {
        if (!head_sent) pieces[count++] = net::buffer(head);
        pieces[count++] = net::buffer(step.payload.data(), step.payload.size());
      }
      beast::error_code wec;
      if (count == 1) {  // awaited directly: no coroutine frame for the common case
        c->sock.arm(idle);
        auto [ec, n] = co_await net::async_write(c->sock.socket(), pieces[0], kDirect);
        wec = c->sock.settle(ec);
      } else {
        wec = co_await write_all(c->sock, std::span<const net::const_buffer>(pieces.data(), count), idle);
      }
      if (wec == beast::error::timeout && c->sock.past_cap()) {
        // timeouts.total ran out while the client was taking the response: the gateway's limit,
        // not the client's slowness (timeouts.idle) nor the backend's doing.
        out.over_total = true;
        out.error = "the response outlasted timeouts.total";
        out.kind = AttemptOutcome::kBrokenMidResponse;
        c->reset_on_close = plan.close_delimited;
        *upstream_reusable = false;
        co_return out;
      }
      if (wec) {
        out.kind = AttemptOutcome::kClientGone;
        out.client_stalled = wec == beast::error::timeout;
        // A client still there but too slow (timeouts.idle) must not take the close for the end.
        c->reset_on_close = plan.close_delimited;
        *upstream_reusable = false;
        co_return out;
      }
      if (!head_sent && plan.streamed) {
        c->release_request();
        head = std::string();
      }
      head_sent = true;
      out.bytes += step.payload.size();
    }
    up->buffer.consume(step.consumed);
    if (step.last) break;
    if (plan.streamed && c->request_released) {
      // The rest of the stream needs no coroutine: hand it over (the session ends here).
      *handoff = std::make_shared<StreamRelay>(w, backend, std::move(plan), *c, started, std::move(out), usage,
                                               first_body_byte, read_room);
      co_return handed_off_outcome();
    }

    if (up->buffer.size() == 0 && read_room < read_max && up->buffer.capacity() >= read_room * 2) {
      read_room = std::min(read_max, up->buffer.capacity());
    }
    auto [room_ptr, room] = up->buffer.prepare(read_room);
    up->sock.arm(idle);
    auto [rec, n] = co_await up->sock.socket().async_read_some(net::buffer(room_ptr, room), kDirect);
    rec = up->sock.settle(rec);
    if (rec == net::error::eof && kind == Kind::kUntilClose) {
      plan.framer.end_of_stream();
      continue;
    }
    if (rec) {
      out.error = rec == beast::error::timeout ? "no bytes within timeouts.idle" : rec.message();
      if (rec == beast::error::timeout && up->sock.past_cap()) {
        out.over_total = true;
        out.error = "the response outlasted timeouts.total";
      }
      *upstream_reusable = false;
      if (!head_sent) co_return unstarted_response_outcome(std::move(out), rec == beast::error::timeout);
      // Bytes already reached the client: no retry is possible. Ending the client connection
      // (without a last chunk, or with a reset where the close ends the body) tells it the
      // response is incomplete.
      out.kind = AttemptOutcome::kBrokenMidResponse;
      c->reset_on_close = plan.close_delimited;
      co_return out;
    }
    up->buffer.commit(n);
    if (n == room && read_room < read_max) read_room = std::min(read_max, read_room * 2);  // a burst
  }
  out.kind = AttemptOutcome::kServed;
  out.keep_alive = plan.keep_alive;
  c->linger_on_close = !plan.keep_alive;
  *upstream_reusable = plan.upstream_keep_alive && up->buffer.size() == 0;  // extra bytes: out of step
  add_token_usage(*backend, usage);
  co_return out;
}

// What the session does after a request.
enum class Next { kClose, kKeepAlive, kHandedOff };

Next next_after(bool keep_alive) { return keep_alive ? Next::kKeepAlive : Next::kClose; }

// The rarer answers of proxy_request live in coroutines of their own: a coroutine frame keeps
// a slot for every temporary of every co_await in it, and proxy_request's is allocated for every
// request (Asio recycles frames only up to about 1 KiB).
net::awaitable<Next> answer_no_backend(Worker* w, ClientConnection* c, const discovery::BackendSet& set) {
  GatewayState& state = *w->state;
  LocalResponse r;
  if (set.all.empty() && state.registry.ever_added() > 0) {
    r = error_response(503, "no inference backends: every one was removed through the admin API (add one with "
                            "POST /admin/backends)");
    r.headers.emplace_back("Retry-After", "5");
  } else if (set.all.empty()) {
    r = error_response(503, "no inference backends are configured: " + state.discovery_how);
    r.headers.emplace_back("Retry-After", "5");
  } else {
    r = error_response(503, "none of the " + std::to_string(set.all.size()) + " backends is healthy now" +
                                unhealthy_summary(set) + "; retry shortly");
    r.headers.emplace_back("Retry-After", "1");
  }
  if (state.config.log.access) spdlog::info("{} {} {} -> - 503 no backend", c->request_id, c->method, c->target);
  co_return next_after(co_await write_local_counted(&state, c, std::move(r), c->head.version_minor,
                                                    c->head.keep_alive(), c->method == "HEAD", c->request_id));
}

// Whether a request carries this gateway's own Via entry: it went out from here and came back.
bool came_back(const http1::Head& head, std::string_view via) {
  const auto name = via.substr(via.find(' ') + 1);  // "infergate-<random>"
  for (const auto& f : head.fields) {
    if (f.name.size() == 3 && iequals(f.name, "via") && f.value.find(name) != std::string_view::npos) return true;
  }
  return false;
}

net::awaitable<Next> answer_loop(Worker* w, ClientConnection* c) {
  GatewayState& state = *w->state;
  spdlog::error("{} {} {}: the request came back to this gateway (its Via field names it): is the gateway one of "
                "its own backends?", c->request_id, c->method, c->target);
  auto r = error_response(508, "request loop: this request came back to the gateway that forwarded it; check that "
                               "the gateway is not one of its own backends");
  co_return next_after(co_await write_local_counted(&state, c, std::move(r), c->head.version_minor, false,
                                                    c->method == "HEAD", c->request_id));
}

// `retry_after` is set when every backend tried answered 503: the client gets a 503 too, with
// the longest Retry-After they asked for (1 s when none did), so that clients that honour it
// (OpenAI's SDKs do) back off instead of taking a 502 for a gateway fault.
net::awaitable<Next> answer_all_failed(Worker* w, ClientConnection* c, unsigned status, std::size_t attempts,
                                       const std::string& failures, unsigned version_minor, bool keep_alive,
                                       bool head_only, std::optional<std::chrono::seconds> retry_after) {
  GatewayState& state = *w->state;
  auto message = "no backend could serve the request after " + std::to_string(attempts) + " attempt(s): " + failures;
  if (state.config.log.access) {
    spdlog::info("{} {} {} -> - {} {}", c->request_id, c->method, c->target, status, message);
  }
  auto response = error_response(status, message);
  if (retry_after) response.headers.emplace_back("Retry-After", std::to_string(retry_after->count()));
  // timeouts.total may be what ended the attempts: the answer saying so has its own write bound,
  // not the spent one (which would cut it at once if the client's buffers were full).
  c->sock.cap_at(Clock::time_point::max());
  co_return next_after(co_await write_local_counted(&state, c, std::move(response), version_minor, keep_alive,
                                                    head_only, c->request_id));
}

// The answer to a request still waiting for its backend when timeouts.shutdown ran out (its
// attempt was ended for it): a 503 that says so, on a connection that closes.
net::awaitable<Next> answer_shutdown(Worker* w, ClientConnection* c, unsigned version_minor, bool head_only) {
  GatewayState& state = *w->state;
  auto message = "the gateway is shutting down: timeouts.shutdown (" +
                 std::to_string(state.config.timeouts.shutdown.count()) + "ms) ran out before the backend answered";
  if (state.config.log.access) spdlog::info("{} {} {} -> - 503 {}", c->request_id, c->method, c->target, message);
  c->sock.cap_at(Clock::time_point::max());
  auto r = error_response(503, std::move(message));
  r.headers.emplace_back("Retry-After", "1");  // OpenAI's SDKs retry it, on a gateway started again
  co_await write_local_counted(&state, c, std::move(r), version_minor, false, head_only, c->request_id);
  co_return Next::kClose;
}

// The backoff before a retry, never past `deadline` (timeouts.total): a request out of time is
// answered when its time is up, not a backoff later. True when no retry may go out: the backoff
// reached the deadline, or the pause ended past it (a busy worker). Both read the precise clock
// the timer runs on: the coarse one can still read a little before the deadline when it fires.
net::awaitable<bool> retry_pause(Worker* w, int attempt, Clock::time_point deadline) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const auto backoff = w->state->retry.backoff(attempt, unit(w->rng));
  const auto left = deadline - Clock::now();
  const bool out_of_time = left <= backoff;
  net::steady_timer pause(w->io, out_of_time ? std::max(left, Clock::duration::zero()) : backoff);
  w->waits.push_back(&pause);
  co_await pause.async_wait(kTuple);
  std::erase(w->waits, &pause);
  co_return out_of_time || Clock::now() >= deadline;
}

// Whether the client left (closed, reset, or half-closed: gone, as for the watch) while no
// attempt watched it: a retry then goes out to nobody. One non-blocking peek, on the retry path
// only; bytes of a pipelined next request say it is still there.
bool client_has_left(tcp::socket& client) {
  if (!client.is_open()) return true;
  char byte = 0;
  const auto n = ::recv(client.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n > 0) return false;
  return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// How a request's wait in the queue for a place on a backend ended (limits.max_inflight_per_backend).
// kHealthy: a wait for a healthy backend (`until_healthy`) ended with one healthy but full.
enum class QueueEnd { kGranted, kFull, kTimedOut, kNoBackend, kShutdown, kClientLeft, kHealthy };

struct Admitted {
  std::shared_ptr<discovery::Backend> backend;  // with one of its places taken, when kGranted
  QueueEnd end = QueueEnd::kGranted;
  bool total_ended = false;  // kTimedOut: timeouts.total, not the queue's time, ended the wait
};

// A waiting request looks again this often: for a backend back in rotation (a place given back
// is handed over at once) and for a client that left, which would hold its queue place for
// nothing.
constexpr auto kQueueLook = std::chrono::seconds(1);

// Waits in the gateway's queue until a backend has room for the request (it is handed a place
// given back, in the order requests queued), the queue's deadline passes, the backends all go
// out of rotation, the client leaves, or the shutdown's deadline ends every wait.
// With `until_healthy` the request came when no backend was healthy (timeouts.no_healthy_backend):
// it waits for one to be (kGranted, or kHealthy when the healthy ones are all full), and its
// deadline is that wait's. A request waiting for room whose backends all leave rotation (all
// restarting) waits for one to come back for up to timeouts.no_healthy_backend (kNoBackend after
// it, or at once when that is 0), and that time does not count towards the queue's deadline.
net::awaitable<Admitted> wait_for_place(Worker* w, ClientConnection* c,
                                        std::span<const discovery::Backend* const> tried,
                                        Clock::time_point deadline, bool until_healthy) {
  GatewayState& state = *w->state;
  Admission& admission = state.admission;
  const auto began = Clock::now();
  // While waiting for room: since when none has been in rotation (max: some is), and how long
  // such waits took in all; the queue's deadline moves on by that.
  auto none_since = Clock::time_point::max();
  Clock::duration not_queued{};
  if (c->queued_since == Clock::time_point::min()) c->queued_since = began;
  auto waiter = std::make_shared<Admission::Waiter>(w->io.get_executor(), tried, c->queued_since);
  if (state.shutdown_cut.load(std::memory_order_relaxed)) co_return Admitted{nullptr, QueueEnd::kShutdown};
  if (!admission.enqueue(waiter)) co_return Admitted{nullptr, QueueEnd::kFull};
  w->waits.push_back(&waiter->timer);
  Admitted result{nullptr, QueueEnd::kTimedOut};
  for (;;) {
    if (auto granted = admission.leave_if_granted(*waiter)) {
      result.backend = std::move(granted);
      result.end = QueueEnd::kGranted;
      break;
    }
    if (state.shutdown_cut.load(std::memory_order_relaxed)) {
      result.end = QueueEnd::kShutdown;
      break;
    }
    // Queued first, then looked: a place given back before the request queued is seen here.
    bool full = false;
    auto set = state.registry.snapshot();
    if (auto* backend = state.registry.pick(*set, tried, admission.per_backend(), &full)) {
      result.backend = backend->shared_from_this();  // while `set` holds it
      result.end = QueueEnd::kGranted;
      break;
    }
    const auto now = Clock::now();
    if (until_healthy && full) {  // one is healthy now: the request queues for room as any other
      result.end = QueueEnd::kHealthy;
      break;
    }
    if (!until_healthy) {
      if (!full) {
        // None healthy (a retry whose other backends were all tried, or are failing, ends here).
        if (!set->routable.empty() || state.config.timeouts.no_healthy_backend.count() == 0) {
          result.end = QueueEnd::kNoBackend;
          break;
        }
        if (none_since == Clock::time_point::max()) none_since = now;
      } else if (none_since != Clock::time_point::max()) {  // back in rotation, and full
        not_queued += now - none_since;
        none_since = Clock::time_point::max();
      }
    }
    if (client_has_left(c->sock.socket())) {
      result.end = QueueEnd::kClientLeft;
      break;
    }
    auto until = std::min(deadline + not_queued, c->total_deadline);
    if (none_since != Clock::time_point::max()) {
      const auto healthy_until = std::min(none_since + state.config.timeouts.no_healthy_backend, c->total_deadline);
      if (now >= healthy_until) {
        result.end = healthy_until == c->total_deadline ? QueueEnd::kTimedOut : QueueEnd::kNoBackend;
        result.total_ended = result.end == QueueEnd::kTimedOut;
        break;
      }
      until = healthy_until;
    } else if (now >= until) {
      result.total_ended = until == c->total_deadline;
      break;
    }
    waiter->timer.expires_after(std::min<Clock::duration>(until - now, kQueueLook));
    co_await waiter->timer.async_wait(kTuple);
  }
  std::erase(w->waits, &waiter->timer);
  if (!until_healthy) {  // timeouts.no_healthy_backend's waits are their own
    const auto end = Clock::now();
    if (none_since != Clock::time_point::max()) not_queued += end - none_since;
    c->queued_for += (end - began) - not_queued;
  }
  // A place handed over meanwhile: used if the request has none (its time just ran out, or a
  // healthy wait just ended), else given back to the next in line.
  if (auto late = admission.leave(*waiter)) {
    if (result.backend == nullptr && (result.end == QueueEnd::kTimedOut || result.end == QueueEnd::kHealthy)) {
      result.backend = std::move(late);
      result.end = QueueEnd::kGranted;
    } else if (admission.limited()) {
      admission.give_back(*late);
    }
  }
  // The client may have left since the last look: its request goes nowhere.
  if (result.end == QueueEnd::kGranted && client_has_left(c->sock.socket())) {
    if (admission.limited()) admission.give_back(*result.backend);
    result.backend = nullptr;
    result.end = QueueEnd::kClientLeft;
  }
  co_return result;
}

// A client that left while its request waited for a place: nothing was sent anywhere.
Next client_left_while_queued(Worker* w, ClientConnection* c, int attempt) {
  GatewayState& state = *w->state;
  state.requests_client_closed.fetch_add(1, std::memory_order_relaxed);
  if (state.config.log.access) {
    auto ms = std::chrono::duration<double, std::milli>(Clock::now() - c->request_started).count();
    spdlog::info("{} {} {} -> - 0 0B {:.1f}ms retries={} client-gone (while queued for a backend with room)",
                 c->request_id, c->method, c->target, ms, attempt);
  }
  return Next::kClose;
}

// The answer to a request that found no backend with room: 429 when the queue was full, 503
// when it waited timeouts.queue (504 when timeouts.total ended the wait). `for_healthy`: the
// request found the queue full as it came to wait for a healthy backend (none was).
net::awaitable<Next> answer_no_room(Worker* w, ClientConnection* c, QueueEnd end, bool total_ended,
                                    bool for_healthy = false) {
  GatewayState& state = *w->state;
  const auto& admission = state.admission;
  const auto routable = state.registry.snapshot()->routable.size();
  // A wait that ends while no backend is in rotation (all unhealthy, draining or removed) says so.
  const auto each = routable == 0
                        ? std::string("no backend is in rotation now (each is unhealthy, draining or removed)")
                        : "each of the " + std::to_string(routable) +
                              " backend(s) in rotation has limits.max_inflight_per_backend (" +
                              std::to_string(admission.per_backend()) + ") requests in flight";
  LocalResponse r;
  if (end == QueueEnd::kFull) {
    state.admission.rejected_full.fetch_add(1, std::memory_order_relaxed);
    r = error_response(429, "the gateway's queue is full: " + std::to_string(admission.max_queued()) +
                                " request(s) (limits.max_queued) already wait for a backend" +
                                (for_healthy ? std::string(", and none of the backends is healthy now (this request would have "
                                                           "waited timeouts.no_healthy_backend for one)")
                                             : " with room, and " + each) +
                                "; retry shortly");
    r.headers.emplace_back("Retry-After", "1");
  } else if (total_ended) {
    r = error_response(504, "timeouts.total (" + std::to_string(state.config.timeouts.total.count()) +
                                "ms) ran out while the request waited for a backend with room: " + each);
  } else {
    state.admission.rejected_timeout.fetch_add(1, std::memory_order_relaxed);
    r = error_response(503, "no backend had room for the request within timeouts.queue (" +
                                std::to_string(state.config.timeouts.queue.count()) + "ms): " + each + "; retry shortly");
    r.headers.emplace_back("Retry-After", "1");
  }
  if (state.config.log.access) {
    spdlog::info("{} {} {} -> - {} {}", c->request_id, c->method, c->target, r.status,
                 end == QueueEnd::kFull ? "queue full" : "no backend with room in time");
  }
  c->sock.cap_at(Clock::time_point::max());
  co_return next_after(co_await write_local_counted(&state, c, std::move(r), c->head.version_minor,
                                                    c->head.keep_alive(), c->method == "HEAD", c->request_id));
}

// timeouts.no_healthy_backend: a request that came when no backend was healthy waits, in the
// queue, for one to be. Nothing when one is (with a limit, the place the wait got is given back:
// the request is picked for as any other), else the answer that ends the request.
net::awaitable<std::optional<Next>> wait_for_healthy(Worker* w, ClientConnection* c, Clock::time_point deadline) {
  GatewayState& state = *w->state;
  const auto admitted = co_await wait_for_place(w, c, {}, deadline, true);
  switch (admitted.end) {
    case QueueEnd::kGranted:
      if (state.admission.limited()) state.admission.give_back(*admitted.backend);
      co_return std::nullopt;
    case QueueEnd::kHealthy:
      co_return std::nullopt;
    case QueueEnd::kShutdown:
      co_return co_await answer_shutdown(w, c, c->head.version_minor, c->method == "HEAD");
    case QueueEnd::kClientLeft:
      co_return client_left_while_queued(w, c, 0);
    case QueueEnd::kFull:
      co_return co_await answer_no_room(w, c, QueueEnd::kFull, false, true);
    default:
      co_return co_await answer_no_backend(w, c, *state.registry.snapshot());
  }
}

// No backend is healthy as a request comes: the 503, or (timeouts.no_healthy_backend) a wait for
// one, after which `set` is the backends as they are then and nothing is returned. (One await in
// proxy_request for all of it: its frame, allocated per request, stays small enough to recycle.)
net::awaitable<std::optional<Next>> no_healthy_backend(Worker* w, ClientConnection* c,
                                                       std::shared_ptr<const discovery::BackendSet>& set) {
  GatewayState& state = *w->state;
  const auto wait = state.config.timeouts.no_healthy_backend;
  if (wait.count() == 0 || set->all.empty()) co_return co_await answer_no_backend(w, c, *set);
  if (auto end = co_await wait_for_healthy(w, c, std::min(Clock::now() + wait, c->total_deadline))) co_return *end;
  set = state.registry.snapshot();
  if (set->routable.empty()) co_return co_await answer_no_backend(w, c, *set);  // gone again at once
  co_return std::nullopt;
}

// Proxies one request, retrying on other backends while nothing reached the client.
net::awaitable<Next> proxy_request(Worker* w, ClientConnection* c) {
  GatewayState& state = *w->state;
  const std::string_view request_id = c->request_id;
  const auto started = Clock::now();
  c->request_started = started;
  const bool client_keep_alive = c->head.keep_alive();
  const unsigned version_minor = c->head.version_minor;
  const bool head_only = c->method == "HEAD";
  c->upstream_head.clear();
  const auto total = state.config.timeouts.total;
  c->total_deadline = total.count() > 0 ? coarse_now() + total : Clock::time_point::max();
  c->sock.cap_at(c->total_deadline);
  c->queued_since = Clock::time_point::min();
  c->queued_for = {};
  c->granted.clear();

  if (came_back(c->head, state.via)) co_return co_await answer_loop(w, c);
  auto set = state.registry.snapshot();
  if (set->routable.empty()) {
    if (auto end = co_await no_healthy_backend(w, c, set)) co_return *end;
  }

  boost::container::small_vector<const discovery::Backend*, 4> tried;
  std::string failures;
  bool last_timed_out = false;
  bool all_unavailable = true;  // every failed attempt was a 503
  std::chrono::seconds retry_after{1};
  discovery::Backend* previous = nullptr;
  const int max_attempts = state.config.retries.max + 1;
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    // A retry looks at the backends as they are now: one drained, removed or ejected during the
    // request is not its target, one back meanwhile may be. The last attempt's snapshot is kept
    // until its retry is counted: a backend removed meanwhile (on the health checker's thread)
    // lives only as long as a snapshot or its probe loop holds it.
    std::shared_ptr<const discovery::BackendSet> previous_set;
    if (attempt > 0) previous_set = std::exchange(set, state.registry.snapshot());
    // With limits.max_inflight_per_backend the pick takes a place, once the request goes out.
    const bool limited = state.admission.limited();
    discovery::Backend* backend = nullptr;
    if (!limited || attempt > 0) {
      backend = state.registry.pick(*set, tried);
      if (backend == nullptr) break;
    }
    if (attempt > 0) {
      if (co_await retry_pause(w, attempt, c->total_deadline)) {  // no retry went out: none is counted
        failures += ", then timeouts.total (" + std::to_string(total.count()) + "ms) ran out";
        last_timed_out = true;
        break;
      }
      if (state.shutdown_cut.load(std::memory_order_relaxed)) co_return co_await answer_shutdown(w, c, version_minor, head_only);
      // The client is not watched between attempts: one that left during the pause gets no retry.
      if (client_has_left(c->sock.socket())) {
        state.requests_client_closed.fetch_add(1, std::memory_order_relaxed);
        if (state.config.log.access) {  // as the access log writes a request no answer reached
          auto ms = std::chrono::duration<double, std::milli>(Clock::now() - started).count();
          spdlog::info("{} {} {} -> - 0 0B {:.1f}ms retries={} client-gone (before retry {}; not sent again)",
                       request_id, c->method, c->target, ms, attempt - 1, attempt);
        }
        co_return Next::kClose;
      }
      // And again after the pause.
      set = state.registry.snapshot();
      if (!limited) {
        backend = state.registry.pick(*set, tried);
        if (backend == nullptr) break;
      }
    }
    if (limited) {
      bool full = false;
      backend = state.registry.pick(*set, tried, state.admission.per_backend(), &full);
      if (backend == nullptr && full) {
        // A retry that queues again waits what is left of timeouts.queue (and keeps its turn):
        // its time queued before counts, its attempts' time does not.
        const auto queue_deadline =
            Clock::now() + std::max(Clock::duration::zero(), Clock::duration(state.config.timeouts.queue) - c->queued_for);
        auto admitted = co_await wait_for_place(w, c, tried, std::min(queue_deadline, c->total_deadline), false);
        if (admitted.end == QueueEnd::kShutdown) co_return co_await answer_shutdown(w, c, version_minor, head_only);
        if (admitted.end == QueueEnd::kClientLeft) co_return client_left_while_queued(w, c, attempt);
        if (admitted.end == QueueEnd::kFull || admitted.end == QueueEnd::kTimedOut) {
          co_return co_await answer_no_room(w, c, admitted.end, admitted.total_ended);
        }
        backend = admitted.backend.get();
        c->granted.push_back(std::move(admitted.backend));  // held for the request
      }
      if (backend == nullptr) break;
    }
    if (attempt > 0) previous->stats.retries.fetch_add(1, std::memory_order_relaxed);
    tried.push_back(backend);
    previous = backend;
    // The client is watched once the exchange has outlived a deadline sweep: most requests are
    // answered well before, and a speculative peek would cost each a system call.
    if (!c->watch) c->watch = std::make_shared<ClientWatch>();
    auto& watch = *c->watch;
    ++watch.generation;
    watch.active = true;
    watch.client_gone = false;
    watch.connection = nullptr;
    c->watching = false;
    w->deadlines.add_slow(*c);
    AttemptOutcome out;
    // The backend's latency and time to first token count from its own attempt: earlier
    // attempts on other backends are not its doing.
    const auto attempt_started = Clock::now();
    {
      BackendPlace place(state.admission, *backend, limited);
      out = co_await run_attempt(w, backend, c, request_id, attempt_started, &c->handoff);
    }
    w->deadlines.remove_slow(*c);
    watch.active = false;
    if (c->watching) {
      beast::error_code ignored;
      c->sock.socket().cancel(ignored);  // ends the watch; nothing else is pending on the client
      c->watching = false;
    }
    // Once the client left, the watch closed the upstream socket: whatever broke after that is
    // not the backend's fault and must not count towards its ejection.
    if (watch.client_gone && out.kind != AttemptOutcome::kServed && out.kind != AttemptOutcome::kHandedOff) {
      out.kind = AttemptOutcome::kClientGone;
    }
    if (out.kind == AttemptOutcome::kHandedOff) {  // it reports the exchange
      if (watch.client_gone) c->handoff->client_left();
      c->handoff->set_retries(attempt);
      co_return Next::kHandedOff;
    }
    // Ended by the shutdown's deadline, not by the backend: an answer saying so, if none began.
    if (out.kind == AttemptOutcome::kFailed && state.shutdown_cut.load(std::memory_order_relaxed)) {
      co_return co_await answer_shutdown(w, c, version_minor, head_only);
    }
    record_attempt(state, *backend, out, attempt_started);
    const auto& id = backend->info().id;
    if (out.kind != AttemptOutcome::kFailed) {
      if (out.status != 0) {
        state.count_response(out.status);
      } else if (out.kind == AttemptOutcome::kClientGone) {
        state.requests_client_closed.fetch_add(1, std::memory_order_relaxed);  // no answer came
      }
      if (out.kind == AttemptOutcome::kBrokenMidResponse && state.shutdown_cut.load(std::memory_order_relaxed)) {
        spdlog::warn("{} {} {}: cut on backend {} at the shutdown deadline (timeouts.shutdown)", request_id,
                     c->method, c->target, id);
      } else if (out.kind == AttemptOutcome::kBrokenMidResponse && out.over_total) {
        spdlog::warn("{} {} {}: cut on backend {}: {}", request_id, c->method, c->target, id, out.error);
      } else if (out.kind == AttemptOutcome::kBrokenMidResponse) {
        spdlog::warn("{} {} {}: backend {} broke the response after it started: {}", request_id,
                     c->method, c->target, id, out.error);
      }
      if (state.config.log.access) {
        auto ms = std::chrono::duration<double, std::milli>(Clock::now() - started).count();
        spdlog::info("{} {} {} -> {} {} {}B {:.1f}ms retries={}{}", request_id, c->method, c->target, id,
                     out.status, out.bytes, ms, attempt,
                     end_note(out, state.shutdown_cut.load(std::memory_order_relaxed)));
      }
      // A client that half-closed while it waited has its answer and then the close: it sends
      // nothing more, and its end of stream, already seen by the watch, would wake no read.
      co_return next_after(out.kind == AttemptOutcome::kServed && out.keep_alive && !watch.client_gone);
    }
    spdlog::warn("{} {} {}: attempt {} on {} failed: {}", request_id, c->method, c->target, attempt + 1,
                 id, out.error);
    failures += (failures.empty() ? "" : ", ") + id + " (" + out.error + ")";
    last_timed_out = out.timed_out;
    all_unavailable = all_unavailable && out.status == 503;
    retry_after = std::max(retry_after, out.retry_after);
    if (out.over_total) break;
    if (out.after_sent && !state.config.retries.after_sent) {
      failures += ", not retried (retries.after_sent is false)";
      break;
    }
  }

  // Nothing tried: every healthy backend's ejection was under way (Registry::pick skips them).
  if (tried.empty()) co_return co_await answer_no_backend(w, c, *set);
  const bool unavailable = all_unavailable && !tried.empty() && !last_timed_out;
  co_return co_await answer_all_failed(w, c, last_timed_out ? 504 : unavailable ? 503 : 502, tried.size(), failures,
                                       version_minor, client_keep_alive, head_only,
                                       unavailable ? std::optional(retry_after) : std::nullopt);
}

// One broadcast request to one backend on a fresh connection.
net::awaitable<void> broadcast_one(Worker* w, std::shared_ptr<discovery::Backend> backend,
                                   std::shared_ptr<const BroadcastRequest> request,
                                   std::shared_ptr<std::vector<BroadcastResult>> results,
                                   std::size_t slot, std::shared_ptr<std::size_t> remaining,
                                   std::shared_ptr<net::steady_timer> done) {
  // Counted down however this ends (an exception included): the admin call waits for the last.
  struct Finish {
    std::size_t& remaining;
    net::steady_timer& done;
    ~Finish() {
      if (--remaining == 0) done.cancel();  // wakes the waiting call
    }
  } finish{*remaining, *done};
  auto& result = (*results)[slot];
  result.backend = backend->info().id;
  TimedSocket sock(w->deadlines, w->io.get_executor());
  auto ec = co_await connect_upstream(w, backend.get(), sock);
  if (!ec) {
    http::request<http::string_body> req{http::string_to_verb(request->method), request->path, 11};
    req.set(http::field::host, backend->info().id);
    req.set(http::field::content_type, "application/json");
    req.body() = request->body;
    req.prepare_payload();
    sock.arm(w->state->config.timeouts.first_byte);  // for the whole exchange
    auto [wec, wn] = co_await http::async_write(sock.socket(), req, kTuple);
    ec = wec;
    if (!ec) {
      beast::flat_buffer buffer;
      http::response_parser<http::string_body> parser;
      parser.body_limit(8 * 1024 * 1024);
      auto [rec, rn] = co_await http::async_read(sock.socket(), buffer, parser, kTuple);
      ec = rec;
      if (!ec) {
        result.status = parser.get().result_int();
        result.body = std::move(parser.get().body());
      }
    }
    ec = sock.settle(ec);
  }
  if (ec) result.error = ec == beast::error::timeout ? "timeout" : ec.message();
}

// Sends one request to every healthy backend concurrently (weight or LoRA updates, cache
// flushes) and collects each answer.
net::awaitable<std::vector<BroadcastResult>> run_broadcast(Worker* w, BroadcastRequest request) {
  auto set = w->state->registry.snapshot();
  std::vector<std::shared_ptr<discovery::Backend>> targets;
  for (const auto& b : set->all) {
    if (b->state() == discovery::BackendState::kHealthy) targets.push_back(b);
  }
  auto results = std::make_shared<std::vector<BroadcastResult>>(targets.size());
  std::vector<BroadcastResult> skipped;
  for (const auto& b : set->all) {
    if (b->state() != discovery::BackendState::kHealthy) {
      skipped.push_back(BroadcastResult{b->info().id, 0, {}, {}, std::string(discovery::to_string(b->state()))});
    }
  }
  if (targets.empty()) co_return skipped;
  auto shared_request = std::make_shared<const BroadcastRequest>(std::move(request));
  auto remaining = std::make_shared<std::size_t>(targets.size());
  auto done = std::make_shared<net::steady_timer>(w->io, Clock::time_point::max());
  for (std::size_t i = 0; i < targets.size(); ++i) {
    net::co_spawn(w->io, broadcast_one(w, targets[i], shared_request, results, i, remaining, done),
                  net::detached);
  }
  if (*remaining > 0) co_await done->async_wait(kTuple);  // cancelled by the last one to finish
  spdlog::info("broadcast {} {} to {} backend(s){}", shared_request->method, shared_request->path,
               targets.size(), skipped.empty() ? "" : fmt::format(", {} not healthy and skipped", skipped.size()));
  results->insert(results->end(), skipped.begin(), skipped.end());
  co_return *results;
}

// After an error answer, the client may still be sending (a body over a limit): read and discard
// what it sends, so that closing does not reset the connection before it reads the answer (a
// reset can discard the answer, and a client failing on its send may never look at it). Like
// nginx's lingering close: as long as bytes keep coming, up to 30 s, and 2 s after the last.
net::awaitable<void> drain_before_close(ClientConnection* c) {
  constexpr auto kLingerTotal = std::chrono::seconds(30);
  constexpr auto kLingerQuiet = std::chrono::seconds(2);
  beast::error_code ignored;
  c->sock.socket().shutdown(tcp::socket::shutdown_send, ignored);
  const auto deadline = coarse_now() + kLingerTotal;
  // The request is over: its memory is given back now, not after the linger, and a shutdown does
  // not wait for it as for a request still arriving.
  c->buffer.clear();
  c->buffer.release();
  c->chunked_body = std::string();
  c->body_memory.release();
  c->arriving.end();
  c->lingered = true;
  while (!c->stopping->load(std::memory_order_relaxed)) {
    auto [room_ptr, room] = c->buffer.prepare(64 * 1024);
    c->sock.arm_at(std::min(deadline, coarse_now() + kLingerQuiet));
    // Like an idle keep-alive wait: a shutdown, or clients waiting for a connection slot, end it.
    c->sock.waiting_between_requests();
    auto [ec, n] = co_await c->sock.socket().async_read_some(net::buffer(room_ptr, room), kTuple);
    if (c->sock.settle(ec)) break;
  }
}

// How reading a request ended.
enum class ReadResult { kRequest, kClosed, kAnswered, kHeadTimedOut, kBodyTimedOut, kOutOfMemory, kOverBodyMemory };

// Bodies up to this size are not counted against limits.max_body_memory: limits.max_client_connections
// bounds what they can hold, and most requests are this small (an atomic update each would cost more).
constexpr std::uint64_t kUncountedBody = 64 * 1024;

// Counts `bytes` of body memory for the current request (bodies up to kUncountedBody are not
// counted). False if that would pass limits.max_body_memory.
bool hold_body(GatewayState& state, ClientConnection& c, std::uint64_t bytes) {
  return bytes <= kUncountedBody || c.body_memory.grow_to(bytes, state.max_body_memory);
}

// Makes room for `need` bytes in a de-chunked body, whose storage is what its reservation
// counts: it doubles, as std::string's would, or grows to what limits.max_body_memory still
// allows. False, with nothing changed, if `need` does not fit.
bool grow_dechunked_body(GatewayState& state, ClientConnection& c, std::size_t need) {
  auto& body = c.chunked_body;
  if (need <= body.capacity()) return true;
  const auto limit = state.max_body_memory;
  std::uint64_t grown = std::min<std::uint64_t>(std::max<std::uint64_t>(need, 2 * body.capacity()),
                                                state.config.limits.max_body);
  if (grown > kUncountedBody && !c.body_memory.grow_to(grown, limit)) {
    const auto held = state.body_memory.load(std::memory_order_relaxed);
    grown = std::min<std::uint64_t>(grown, c.body_memory.bytes() + (limit - std::min(limit, held)));
    if (grown < need || !c.body_memory.grow_to(grown, limit)) return false;
  }
  // A fresh string's first allocation is exactly what is asked (a reserve on a full one may
  // double past it, uncounted).
  std::string fresh;
  fresh.reserve(grown);
  fresh.append(body);
  body.swap(fresh);
  return true;
}

// A failed read of a request ends it: with a timeout the client is still there, to be told.
// (Answered by the session, not in read_request: the extra awaits would grow its frame past
// what Asio recycles, an allocation on every request.)
ReadResult request_read_failed(const GatewayState& state, const ClientConnection& c, beast::error_code ec,
                                bool in_head) {
  if (ec == net::error::no_memory) return ReadResult::kOutOfMemory;
  if (ec != beast::error::timeout) {
    // No answer can go to a client that left in the middle of a request, but the access log
    // says it came: otherwise a request its client believes sent leaves no trace.
    if (state.config.log.access) {
      // Of a body, its bytes only: the head is not counted, and a chunked body's decoded part
      // (its raw chunks are dropped once decoded) is, with the chunks not yet decoded.
      const auto came = in_head ? c.buffer.size()
                                : c.buffer.size() - std::min(c.buffer.size(), c.head.size) +
                                      (c.head.chunked ? c.chunked_body.size() : 0);
      spdlog::info("- - - -> - the client left in the middle of a request's {} ({} bytes of it came; client {})",
                   in_head ? "head" : "body", came, c.client_ip);
    }
    return ReadResult::kClosed;
  }
  return in_head ? ReadResult::kHeadTimedOut : ReadResult::kBodyTimedOut;
}

// The answer is built here, not by the caller: a coroutine frame keeps a slot for every
// temporary of every co_await in it, and read_request runs for every request.
net::awaitable<ReadResult> answer_and_close(GatewayState* state, ClientConnection* c, unsigned status,
                                            std::string_view message, std::string_view detail = {},
                                            bool retry_soon = false) {
  std::string text(message);
  text += detail;
  // A request refused before it had an id or a backend still gets its access-log line.
  if (state->config.log.access) spdlog::info("- - - -> - {} {} (client {})", status, text, c->client_ip);
  auto response = error_response(status, text);
  if (retry_soon) response.headers.emplace_back("Retry-After", "1");
  co_await write_local_counted(state, c, std::move(response), 1, false, false, "");
  co_await drain_before_close(c);
  co_return ReadResult::kAnswered;
}

// Reads more bytes from the client into its buffer, `min_free` bytes of room at least, the
// buffer growing to `max_capacity` at most beyond that. `between_requests`: the wait is for a
// next request, which a graceful shutdown may end. Memory the buffer cannot get (an address-space
// limit: ulimit -v, Slurm's) is the error no_memory, for the session to answer.
net::awaitable<beast::error_code> read_more(ClientConnection* c, std::size_t min_free, Clock::time_point deadline,
                                            bool between_requests = false,
                                            std::size_t max_capacity = static_cast<std::size_t>(-1)) {
  char* room_ptr = nullptr;
  std::size_t room = 0;
  try {
    std::tie(room_ptr, room) = c->buffer.prepare(min_free, max_capacity);
  } catch (const std::bad_alloc&) {
    co_return net::error::no_memory;
  }
  if (c->read_directly) {
    c->read_directly = false;
    beast::error_code ec;
    const std::size_t n = c->sock.socket().read_some(net::buffer(room_ptr, room), ec);  // non-blocking
    if (!ec) c->buffer.commit(n);
    if (ec != net::error::would_block && ec != net::error::try_again) co_return ec;
  }
  c->sock.arm_at(deadline);
  if (between_requests) c->sock.waiting_between_requests();
  auto [ec, n] = co_await c->sock.socket().async_read_some(net::buffer(room_ptr, room), kDirect);
  ec = c->sock.settle(ec);
  if (!ec) c->buffer.commit(n);
  co_return ec;
}

// Clients holding back a large body until told to send it (curl does above 1 MiB) get
// "100 Continue" once, when the gateway first needs the body.
net::awaitable<bool> send_continue(ClientConnection* c, bool* sent, std::chrono::milliseconds timeout) {
  // An HTTP/1.0 client cannot take an interim answer (RFC 9110 10.1.1): it just sends the body.
  if (!c->head.expect_continue || c->head.version_minor == 0 || *sent) co_return true;
  *sent = true;
  static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
  co_return !co_await write_all(c->sock, net::buffer(kContinue.data(), kContinue.size()), timeout);
}

// Whether the bytes after `searched` may end the head (a blank line) or make it malformed (a
// bare LF), so that parsing it again can tell something new.
bool may_end_head(std::string_view data, std::size_t searched) {
  for (auto i = data.find('\n', searched); i != std::string_view::npos; i = data.find('\n', i + 1)) {
    if (i == 0 || data[i - 1] != '\r') return true;                              // a bare LF
    if (i >= 3 && data[i - 2] == '\n' && data[i - 3] == '\r') return true;       // CRLF CRLF
  }
  return false;
}

// A request that could not be read whole is answered before the close: the client stopped
// sending halfway (its head not whole within timeouts.client_header, its body silent for
// timeouts.idle: 408), or the gateway had no memory for its body (503; with Retry-After when
// other requests' bodies hold limits.max_body_memory: it is free again once they are done).
net::awaitable<void> answer_unread_request(GatewayState* state, ClientConnection* c, ReadResult why) {
  const auto& t = state->config.timeouts;
  if (why == ReadResult::kOverBodyMemory) {
    const auto held = state->body_memory.load(std::memory_order_relaxed);
    spdlog::warn("a request body from {} would take the request bodies held at once past limits.max_body_memory ({}; "
                 "{} held now): answered 503 with Retry-After",
                 c->client_ip, config::format_size(state->max_body_memory), config::format_size(held));
    co_await answer_and_close(state, c, 503,
                              "the gateway holds as many request bodies as limits.max_body_memory allows (" +
                                  config::format_size(state->max_body_memory) + "); try again shortly",
                              {}, true);
    co_return;
  }
  if (why == ReadResult::kOutOfMemory) {
    spdlog::error("no memory for a request body of {} bytes from {}", c->head.content_length.value_or(0), c->client_ip);
    co_await answer_and_close(state, c, 503, "the gateway has no memory for this request body now");
    co_return;
  }
  if (state->shutdown_cut.load(std::memory_order_relaxed)) {
    co_await answer_and_close(state, c, 503,
                              "the gateway is shutting down: timeouts.shutdown (" +
                                  std::to_string(t.shutdown.count()) + "ms) ran out before the request arrived whole");
    co_return;
  }
  const auto text = why == ReadResult::kHeadTimedOut
                        ? "the request head did not arrive whole within timeouts.client_header (" +
                              std::to_string(t.client_header.count()) + "ms)"
                        : "the request body stopped arriving: no bytes within timeouts.idle (" +
                              std::to_string(t.idle.count()) + "ms)";
  co_await answer_and_close(state, c, 408, text);
}

// Whether the request line has not ended within the first `max_head` bytes (stray CRLFs before
// it aside).
bool request_line_unended(std::string_view data, std::size_t max_head) noexcept {
  const auto start = data.find_first_not_of("\r\n");
  if (start == std::string_view::npos) return false;
  const auto end = data.find("\r\n", start);
  return end == std::string_view::npos || end >= max_head;
}

// Reads one request: its head into `c->head`, its body into `c->body`. The head's views point
// into the buffer, so the head is parsed again if reading the body moved the buffer.
net::awaitable<ReadResult> read_request(Worker* w, ClientConnection* c) {
  const auto& cfg = w->state->config;
  const std::size_t max_head = cfg.limits.max_header;
  std::optional<Clock::time_point> header_deadline;
  http1::Parse parsed = http1::Parse::kIncomplete;
  // Once the request line has passed, the head is parsed again only when its end may have come:
  // a head sent a few bytes at a time would otherwise be parsed from its start on every read.
  std::size_t searched = 0;  // bytes known not to hold the blank line or a bare LF
  bool request_line_seen = false;
  for (;;) {
    const auto data = c->buffer.data();
    if (!data.empty()) c->arriving.begin();
    if (!request_line_seen || data.size() >= max_head || may_end_head(data, searched)) {
      parsed = http1::parse_request(data, max_head, c->head);
      if (parsed != http1::Parse::kIncomplete) break;
      const auto start = data.find_first_not_of("\r\n");  // past stray CRLFs between requests
      request_line_seen = start != std::string_view::npos && data.find("\r\n", start) != std::string_view::npos;
    }
    searched = data.size();
    Clock::time_point deadline;
    const bool between_requests = c->buffer.size() == 0;
    if (between_requests) {
      // A new connection has timeouts.client_header to start its first request, as for the
      // rest of the head: only a connection that was answered may idle for client_idle.
      deadline = coarse_now() + (c->requests == 0 ? cfg.timeouts.client_header : cfg.timeouts.client_idle);
    } else {
      if (!header_deadline) header_deadline = coarse_now() + cfg.timeouts.client_header;
      deadline = *header_deadline;
    }
    if (auto ec = co_await read_more(c, kClientRead, deadline, between_requests)) {
      // A connection that sent nothing (an idle keep-alive one) is closed without a word.
      co_return between_requests ? ReadResult::kClosed : request_read_failed(*w->state, *c, ec, true);
    }
  }
  if (parsed == http1::Parse::kTooLarge) {
    // A request line that alone fills the limit has a target too long to take (RFC 9112 3: 414).
    const bool line_too_long = request_line_unended(c->buffer.data(), max_head);
    co_return co_await answer_and_close(w->state, c, line_too_long ? 414 : 431,
                                        line_too_long ? "request target exceeds limits.max_header"
                                                      : "request header exceeds limits.max_header");
  }
  if (parsed == http1::Parse::kBad) {
    co_return co_await answer_and_close(w->state, c, 400, "malformed HTTP request: ", c->head.error);
  }

  auto& h = c->head;
  const char* const start = c->buffer.data().data();
  bool continue_sent = false;
  std::size_t size = h.size;
  if (h.content_length) {
    if (*h.content_length > cfg.limits.max_body) {
      co_return co_await answer_and_close(w->state, c, 413, "request body exceeds limits.max_body");
    }
    // A body that cannot fit now is refused from the head (before a 100 Continue: a client that
    // waits for one sends none of it). Memory is taken as the body arrives, below, not as the
    // head announces: a head alone must not hold limits.max_body_memory from everyone else.
    if (*h.content_length > kUncountedBody &&
        w->state->body_memory.load(std::memory_order_relaxed) + *h.content_length > w->state->max_body_memory) {
      co_return ReadResult::kOverBodyMemory;
    }
    size = h.size + static_cast<std::size_t>(*h.content_length);
    if (!hold_body(*w->state, *c, std::min(c->buffer.size(), size) - h.size)) {
      co_return ReadResult::kOverBodyMemory;  // what came with the head
    }
    if (c->buffer.size() < size) {
      if (!co_await send_continue(c, &continue_sent, cfg.timeouts.idle)) co_return ReadResult::kClosed;
      while (c->buffer.size() < size) {
        // Room for the body grows with what arrives (doubling from kBodyRoom), not with what
        // the head announces: a head alone must not make the gateway take limits.max_body of
        // memory. A 32 KiB prompt is still one or two reads, not dozens. timeouts.idle bounds
        // each wait for more bytes, not the whole upload.
        const std::size_t room = std::min(size - c->buffer.size(), std::max(kBodyRoom, c->buffer.size()));
        if (!hold_body(*w->state, *c, std::min(c->buffer.capacity_for(room, size), size) - h.size)) {
          co_return ReadResult::kOverBodyMemory;  // what the buffer will hold for it, read or not
        }
        if (auto ec = co_await read_more(c, room, coarse_now() + cfg.timeouts.idle, false, size)) {
          co_return request_read_failed(*w->state, *c, ec, false);
        }
      }
    }
  } else if (h.chunked) {
    c->chunked_body.clear();
    http1::ChunkedDecoder decoder;
    bool too_big = false;
    bool over_memory = false;
    for (;;) {
      http1::ChunkedDecoder::Result r;
      try {
        r = decoder.feed(c->buffer.data().substr(size), [&](std::string_view d) {
          const auto need = c->chunked_body.size() + d.size();
          if (need > cfg.limits.max_body) too_big = true;
          if (too_big || over_memory) return;
          over_memory = !grow_dechunked_body(*w->state, *c, need);
          if (!over_memory) c->chunked_body.append(d);
        });
      } catch (const std::bad_alloc&) {
        co_return ReadResult::kOutOfMemory;
      }
      // The raw chunks are dropped once decoded (the head before them stays put): only the
      // decoded body, bounded by limits.max_body, is kept, whatever the framing's overhead.
      c->buffer.erase(size, r.consumed);
      if (too_big) {
        co_return co_await answer_and_close(w->state, c, 413, "request body exceeds limits.max_body");
      }
      if (over_memory) co_return ReadResult::kOverBodyMemory;
      if (r.bad) co_return co_await answer_and_close(w->state, c, 400, "malformed chunked request body");
      if (r.done) break;
      if (!co_await send_continue(c, &continue_sent, cfg.timeouts.idle)) co_return ReadResult::kClosed;
      if (auto ec = co_await read_more(c, kClientRead, coarse_now() + cfg.timeouts.idle)) {
        co_return request_read_failed(*w->state, *c, ec, false);
      }
    }
  }
  if (c->buffer.data().data() != start) http1::parse_request(c->buffer.data(), max_head, c->head);
  // 501, not 405: a 405 must list the methods allowed, and any other method is (RFC 9110 15.6.2).
  if (h.method == "CONNECT") co_return co_await answer_and_close(w->state, c, 501, "CONNECT is not supported");
  // An absolute-form target (RFC 9112 3.2.2, what a client configured for a forward proxy sends)
  // is routed and forwarded by its path, like any other.
  if (h.target.size() > 7 && h.target[0] != '/' && (h.target[4] == ':' || h.target[5] == ':')) {
    const auto scheme_end = h.target.find("://");
    if (scheme_end == 4 || scheme_end == 5) {
      const auto scheme = h.target.substr(0, scheme_end);
      if (iequals(scheme, "http") || iequals(scheme, "https")) {
        // The authority ends at the path or, when there is none, at the query.
        const auto path = h.target.find_first_of("/?", scheme_end + 3);
        if (path == std::string_view::npos) {
          h.target = "/";
        } else if (h.target[path] == '/') {
          h.target = h.target.substr(path);
        } else {
          c->absolute_target.assign("/").append(h.target.substr(path));
          h.target = c->absolute_target;
        }
      }
    }
  }
  // Anything else that is not a path (`GET health`, `GET ftp://x/`) is no target a backend
  // serves: refused here, not forwarded (`OPTIONS *` aside).
  if (!h.target.starts_with('/') && !(h.target == "*" && h.method == "OPTIONS")) {
    co_return co_await answer_and_close(w->state, c, 400, "malformed HTTP request: the target must be a path ",
                                        "(/v1/...) or an http(s) URL");
  }
  c->request_size = size;
  c->request_released = false;
  ++c->requests;
  c->method = h.method;
  c->target = h.target;
  c->body = h.chunked ? std::string_view(c->chunked_body)
                      : c->buffer.data().substr(h.size, size - h.size);
  co_return ReadResult::kRequest;
}

// Scrapes, probes and the status page: read-only looks at the gateway.
bool is_monitoring(std::string_view path) noexcept {
  return path == "/metrics" || path == "/health" || path == "/ready" || path == "/" || path == "/status";
}

// The gateway's own endpoints: monitoring and the admin API.
bool is_control_plane(std::string_view path) noexcept {
  return is_monitoring(path) || path == "/admin" || path.starts_with("/admin/");
}

}  // namespace

net::awaitable<void> run_client_session(Worker* w, tcp::socket socket, Listener listener, ConnectionSlot slot,
                                        bool answered_before) {
  GatewayState& state = *w->state;
  ConnectionCount connection_count(listener == Listener::kGateway ? &state.client_connections : nullptr);

  beast::error_code ec;
  socket.set_option(tcp::no_delay(true), ec);
  socket.non_blocking(true, ec);  // for read_directly and send_now
  auto remote = socket.remote_endpoint(ec);
  ClientConnection c(w, std::move(socket));
  c.requests = answered_before ? 1 : 0;
  c.client_ip = ec ? std::string("unknown") : remote.address().to_string();

  try {
    for (;;) {
      if (state.stopping.load(std::memory_order_relaxed)) break;
      c.sock.cap_at(Clock::time_point::max());  // the previous request's timeouts.total is done with
      const auto read = co_await read_request(w, &c);
      if (read == ReadResult::kHeadTimedOut || read == ReadResult::kBodyTimedOut || read == ReadResult::kOutOfMemory ||
          read == ReadResult::kOverBodyMemory) {
        co_await answer_unread_request(&state, &c, read);
      }
      if (read != ReadResult::kRequest) break;

      const auto& h = c.head;
      const auto path = h.target.substr(0, h.target.find('?'));
      // Scrapes, probes, the status page and admin calls are not traffic: they do not count in
      // infergate_requests_total, and monitoring does not count in flight either (a scrape would
      // see itself, as the status page's poll of GET /admin/backends did). Admin calls that
      // change something do, so that a shutdown lets a broadcast finish. Nothing that comes to
      // metrics.listen is traffic: it serves scrapers, and refuses everything else.
      const bool scraper = listener == Listener::kMetricsOnly;
      const bool control = scraper || is_control_plane(path);
      const bool admin_read = (h.method == "GET" || h.method == "HEAD") && path.starts_with("/admin/");
      std::optional<InflightGuard> inflight;
      if (!scraper && !is_monitoring(path) && !admin_read) inflight.emplace(state.inflight_requests);
      c.arriving.end();  // after it counts in flight: a shutdown never sees it in neither
      bool keep_alive = false;
      const bool head_only = h.method == "HEAD";  // methods are case-sensitive (RFC 9110 9.1)
      RouteDecision decision;
      if (scraper && path != "/metrics" && path != "/health") {
        decision = error_response(404, "this listener (metrics.listen) serves /metrics and /health only");
      } else {
        decision = route(state, RequestView{h.method, h.target, h.find("authorization"), c.body});
      }
      if (auto* local = std::get_if<LocalResponse>(&decision)) {
        if (!control) state.count_response(local->status);
        keep_alive = co_await write_local(&c, std::move(*local), h.version_minor, h.keep_alive(), head_only, "");
      } else if (auto* broadcast = std::get_if<BroadcastRequest>(&decision)) {
        auto answer = broadcast_response(co_await run_broadcast(w, std::move(*broadcast)));
        keep_alive = co_await write_local(&c, std::move(answer), h.version_minor, h.keep_alive(), head_only, "");
      } else {
        // The client's id is kept when it is short visible ASCII; it goes into logs and headers.
        auto id = h.find("x-request-id");
        if (id.empty() || id.size() > 200 || std::any_of(id.begin(), id.end(), [](char ch) {
              return static_cast<unsigned char>(ch) <= ' ' || static_cast<unsigned char>(ch) >= 0x7f;
            })) {
          make_request_id(*w, c.request_id);
        } else {
          c.request_id.assign(id);
        }
        const auto next = co_await proxy_request(w, &c);
        if (next == Next::kHandedOff) {
          // The stream's relay owns the connection now (and starts a new session after it).
          auto relay = std::move(c.handoff);
          relay->start(std::move(c.sock.socket()), std::move(slot));
          co_return;
        }
        keep_alive = next == Next::kKeepAlive;
      }
      if (!keep_alive) break;
      c.buffer.consume(c.request_size);
      c.request_size = 0;
      // Empty lines between requests (RFC 9112 2.2) are dropped here: a client that ends its body
      // with a stray CRLF is idle, not in the middle of a head.
      while (c.buffer.data().starts_with("\r\n")) c.buffer.consume(2);
      // The request's body memory goes with its reservation: a huge prompt's buffer or de-chunked
      // copy is not kept for the connection's next requests.
      if (c.buffer.capacity() > 256 * 1024) {
        if (c.buffer.size() == 0) c.buffer.release();
        else c.buffer.reallocate(c.buffer.size());  // pipelined bytes: kept, in a buffer their size
      }
      if (c.chunked_body.capacity() > kUncountedBody) c.chunked_body = std::string();
      c.body_memory.release();
    }
  } catch (const std::exception& e) {
    spdlog::debug("client session ended: {}", e.what());
  }
  // After a whole answer the gateway ends the connection on, or with the client's bytes unread
  // (not after drain_before_close, which lingered already). On its own: the connection's
  // buffers, and the request's body memory, go with this frame now.
  if (!c.reset_on_close && !c.lingered && (c.linger_on_close || unread_from_client(c.sock.socket()))) {
    net::co_spawn(w->io, linger_close(w, std::move(c.sock.socket()), std::move(slot), std::move(connection_count)),
                  net::detached);
    co_return;
  }
  close_client(c.sock.socket(), c.reset_on_close);
}

}  // namespace infergate::gateway
