#include "gateway/session.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <string>
#include <span>
#include <variant>

#include "gateway/errors.hpp"
#include "gateway/router.hpp"
#include "gateway/usage_scanner.hpp"

namespace infergate::gateway {
namespace {

using Clock = std::chrono::steady_clock;
using Request = http::request<http::string_body>;
constexpr auto kTuple = net::as_tuple(net::use_awaitable);

// Header fields that describe one connection, not the message (RFC 9110 section 7.6.1).
constexpr std::array<http::field, 7> kHopByHop = {
    http::field::connection,       http::field::keep_alive, http::field::proxy_connection,
    http::field::te,               http::field::trailer,    http::field::upgrade,
    http::field::proxy_authorization};

template <bool IsRequest, typename Fields>
void strip_hop_by_hop(http::header<IsRequest, Fields>& h) {
  // Fields named in Connection are hop-by-hop too.
  auto connection = h[http::field::connection];
  if (!connection.empty()) {
    for (auto token : http::token_list{connection}) {
      if (!beast::iequals(token, "close") && !beast::iequals(token, "keep-alive")) h.erase(token);
    }
  }
  for (auto f : kHopByHop) h.erase(f);
}

std::string make_request_id(Worker& w) {
  std::array<char, 40> buf{};
  auto n = std::snprintf(buf.data(), buf.size(), "ig-%zx-%08x-%llx", w.index,
                         static_cast<unsigned>(w.rng()),
                         static_cast<unsigned long long>(++w.request_counter));
  return std::string(buf.data(), static_cast<std::size_t>(n));
}

net::awaitable<bool> write_local(beast::tcp_stream* client, LocalResponse response, unsigned version,
                                 bool keep_alive, std::string request_id) {
  http::response<http::string_body> res{static_cast<http::status>(response.status), version};
  res.set(http::field::server, "infergate");
  res.set(http::field::content_type, response.content_type);
  if (!request_id.empty()) res.set("X-Request-ID", request_id);
  for (auto& [name, value] : response.headers) res.set(name, value);
  res.body() = std::move(response.body);
  res.keep_alive(keep_alive);
  res.prepare_payload();
  client->expires_after(std::chrono::seconds(30));
  auto [ec, n] = co_await http::async_write(*client, res, kTuple);
  co_return !ec && keep_alive;
}

net::awaitable<bool> write_local_counted(GatewayState* state, beast::tcp_stream* client,
                                         LocalResponse response, unsigned version, bool keep_alive,
                                         std::string request_id) {
  state->count_response(response.status);
  co_return co_await write_local(client, std::move(response), version, keep_alive, std::move(request_id));
}

// What happened to one attempt at one backend.
struct AttemptOutcome {
  enum Kind { kServed, kFailed, kClientGone, kBrokenMidResponse } kind = kFailed;
  bool keep_alive = false;     // kServed: the client connection may serve another request
  bool timed_out = false;      // kFailed: a timeout (504 if it was the last try)
  std::string error;           // kFailed: why, for the final error message and logs
  unsigned status = 0;
  std::uint64_t bytes = 0;
};

AttemptOutcome client_gone_outcome() {
  AttemptOutcome out;
  out.kind = AttemptOutcome::kClientGone;
  return out;
}

// Shared by an attempt and the client watcher racing it.
struct AttemptContext {
  UpstreamConnection* connection = nullptr;
  bool client_gone = false;
  bool finished = false;
};

bool is_reset(const beast::error_code& ec) {
  return ec == http::error::end_of_stream || ec == net::error::eof ||
         ec == net::error::connection_reset || ec == net::error::broken_pipe ||
         ec == http::error::partial_message;
}

net::awaitable<beast::error_code> connect_upstream(Worker* w, const discovery::Backend* backend,
                                                   UpstreamConnection* c) {
  const auto& info = backend->info();
  auto it = w->resolved.find(backend->index());
  if (it == w->resolved.end()) {
    tcp::resolver resolver(w->io);
    c->stream.expires_after(w->state->config.timeouts.connect);
    auto [rec, results] =
        co_await resolver.async_resolve(info.host, std::to_string(info.port), kTuple);
    if (rec) co_return rec;
    std::vector<tcp::endpoint> endpoints;
    for (const auto& r : results) endpoints.push_back(r.endpoint());
    it = w->resolved.emplace(backend->index(), std::move(endpoints)).first;
  }
  c->stream.expires_after(w->state->config.timeouts.connect);
  auto [ec, ep] = co_await c->stream.async_connect(it->second, kTuple);
  if (ec) {
    w->resolved.erase(backend->index());  // the address may have moved; resolve afresh next time
    co_return ec;
  }
  beast::error_code ignored;
  c->stream.socket().set_option(tcp::no_delay(true), ignored);
  co_return beast::error_code{};
}

// Relays the response header and then body bytes as they arrive (SSE events are never held).
net::awaitable<AttemptOutcome> relay_response(Worker* w, beast::tcp_stream* client,
                                              UpstreamConnection* upstream,
                                              http::response_parser<http::buffer_body>* parser,
                                              unsigned client_version, bool client_keep_alive,
                                              const std::string* request_id,
                                              discovery::Backend* backend, Clock::time_point started) {
  AttemptOutcome out;
  auto& res = parser->get();
  out.status = res.result_int();
  const bool streamed = res[http::field::content_type].starts_with("text/event-stream");
  bool first_body_byte = true;
  UsageScanner usage;
  strip_hop_by_hop(res.base());
  if (res.find("X-Request-ID") == res.end()) res.set("X-Request-ID", *request_id);
  if (client_version < 11 && res.chunked()) {
    // An HTTP/1.0 client cannot read chunked: send the body raw and close to end it.
    res.chunked(false);
    client_keep_alive = false;
  }
  res.version(client_version);
  res.keep_alive(client_keep_alive);

  // The response is framed here rather than by Beast's serializer: the head once, then each
  // piece of body as it arrives, re-chunked when the upstream response was chunked. One gather
  // write per piece; the head travels with the first piece when the body is already here.
  const bool chunked = res.chunked();
  std::string head;
  head.reserve(512);
  head += client_version >= 11 ? "HTTP/1.1 " : "HTTP/1.0 ";
  head += std::to_string(out.status);
  head += ' ';
  head += res.reason().empty() ? http::obsolete_reason(res.result()) : res.reason();
  head += "\r\n";
  for (const auto& field : res) {
    head += field.name_string();
    head += ": ";
    head += field.value();
    head += "\r\n";
  }
  head += "\r\n";
  bool head_sent = false;
  const auto idle = w->state->config.timeouts.idle;
  if (upstream->buffer.size() == 0 && !parser->is_done()) {
    // Nothing of the body is here yet (a stream waiting for its first token): send the head now.
    client->expires_after(idle);
    auto [hec, hn] = co_await net::async_write(*client, net::buffer(head), kTuple);
    if (hec) {
      out.kind = AttemptOutcome::kClientGone;
      co_return out;
    }
    head_sent = true;
  }

  const auto buf = upstream->relay_space(streamed ? 4 * 1024 : 16 * 1024);
  std::array<char, 24> chunk_size{};
  static constexpr std::string_view kCrlf = "\r\n";
  static constexpr std::string_view kLastChunk = "0\r\n\r\n";
  for (;;) {
    std::size_t n = 0;
    if (!parser->is_done()) {
      auto& body = res.body();
      body.data = buf.data();
      body.size = buf.size();
      upstream->stream.expires_after(idle);
      auto [rec, rn] = co_await http::async_read_some(upstream->stream, upstream->buffer, *parser, kTuple);
      if (rec == http::error::need_buffer) rec = {};
      if (rec) {
        // Bytes already reached the client: no retry is possible. Ending the client connection
        // (without a last chunk) tells it the response is incomplete.
        out.kind = AttemptOutcome::kBrokenMidResponse;
        out.error = rec.message();
        co_return out;
      }
      n = buf.size() - body.size;
      if (n == 0 && !parser->is_done()) continue;  // a pass that parsed framing only
    }
    const bool last = parser->is_done();
    std::array<net::const_buffer, 5> pieces;
    std::size_t count = 0;
    if (!head_sent) pieces[count++] = net::buffer(head);
    if (n > 0) {
      if (chunked) {
        auto len = std::snprintf(chunk_size.data(), chunk_size.size(), "%zx\r\n", n);
        pieces[count++] = net::buffer(chunk_size.data(), static_cast<std::size_t>(len));
      }
      pieces[count++] = net::buffer(buf.data(), n);
      if (chunked) pieces[count++] = net::buffer(kCrlf.data(), kCrlf.size());
      out.bytes += n;
      usage.feed(std::string_view(buf.data(), n));
      if (first_body_byte && streamed) backend->stats.ttft.observe(Clock::now() - started);
      first_body_byte = false;
    }
    if (last && chunked) pieces[count++] = net::buffer(kLastChunk.data(), kLastChunk.size());
    if (count > 0) {
      client->expires_after(idle);
      auto [wec, wn] = co_await net::async_write(*client, std::span(pieces.data(), count), kTuple);
      if (wec) {
        out.kind = AttemptOutcome::kClientGone;
        co_return out;
      }
      head_sent = true;
    }
    if (last) break;
  }
  out.kind = AttemptOutcome::kServed;
  out.keep_alive = client_keep_alive;
  if (auto n = usage.prompt_tokens()) backend->stats.prompt_tokens.fetch_add(*n, std::memory_order_relaxed);
  if (auto n = usage.completion_tokens()) backend->stats.completion_tokens.fetch_add(*n, std::memory_order_relaxed);
  co_return out;
}

void serialize_request_head(const Request& req, std::string& out) {
  out.reserve(256 + req.target().size());
  out += req.method_string();
  out += ' ';
  out += req.target();
  out += " HTTP/1.1\r\n";
  for (const auto& field : req) {
    out += field.name_string();
    out += ": ";
    out += field.value();
    out += "\r\n";
  }
  out += "\r\n";
}

// One try at one backend: connection (pooled or new), request out, response back. A pooled
// connection the backend had closed is replaced by a fresh one once, invisibly.
net::awaitable<AttemptOutcome> run_attempt(Worker* w, discovery::Backend* backend,
                                           AttemptContext* ctx, beast::tcp_stream* client,
                                           Request* req, std::string* request_head, bool client_keep_alive,
                                           const std::string* request_id, Clock::time_point started) {
  const auto& cfg = w->state->config;
  bool fresh_retry_used = false;
  for (;;) {
    auto conn = w->pool.acquire(backend->index());
    const bool reused = conn != nullptr;
    if (!conn) {
      conn = std::make_unique<UpstreamConnection>(w->io.get_executor());
      ctx->connection = conn.get();
      auto ec = co_await connect_upstream(w, backend, conn.get());
      ctx->connection = nullptr;
      if (ec) {
        AttemptOutcome out;
        out.kind = ctx->client_gone ? AttemptOutcome::kClientGone : AttemptOutcome::kFailed;
        out.timed_out = ec == beast::error::timeout;
        out.error = out.timed_out ? "connect timeout" : "connect: " + ec.message();
        co_return out;
      }
    }
    ctx->connection = conn.get();

    conn->stream.expires_after(cfg.timeouts.idle);
    // The head is serialized once per request (retries reuse it); head and body go out in one
    // gather write.
    if (request_head->empty()) serialize_request_head(*req, *request_head);
    std::array<net::const_buffer, 2> request_bytes{net::buffer(*request_head), net::buffer(req->body())};
    auto [wec, wn] = co_await net::async_write(conn->stream, request_bytes, kTuple);
    if (!wec) {
      http::response_parser<http::buffer_body> parser;
      parser.body_limit(boost::none);  // responses are streamed, never held whole
      parser.header_limit(static_cast<std::uint32_t>(cfg.limits.max_header));
      if (req->method() == http::verb::head) parser.skip(true);
      conn->stream.expires_after(cfg.timeouts.first_byte);
      auto [rec, rn] = co_await http::async_read_header(conn->stream, conn->buffer, parser, kTuple);
      if (!rec) {
        const auto status = parser.get().result_int();
        if (RetryPolicy::is_retryable_status(status)) {
          ctx->connection = nullptr;
          AttemptOutcome out;
          out.error = "HTTP " + std::to_string(status);
          out.status = status;
          co_return out;  // the connection closes with `conn`; its body is not worth reading
        }
        const bool upstream_keep_alive = parser.get().keep_alive();
        auto out = co_await relay_response(w, client, conn.get(), &parser, req->version(),
                                           client_keep_alive, request_id, backend, started);
        ctx->connection = nullptr;
        if (out.kind == AttemptOutcome::kServed && upstream_keep_alive && parser.is_done() &&
            !ctx->client_gone) {
          w->pool.release(backend->index(), std::move(conn));
        }
        co_return out;
      }
      wec = rec;
    }
    ctx->connection = nullptr;
    if (ctx->client_gone) co_return client_gone_outcome();
    if (reused && !fresh_retry_used && is_reset(wec)) {
      fresh_retry_used = true;  // the backend closed a parked connection: not its fault
      continue;
    }
    AttemptOutcome out;
    out.timed_out = wec == beast::error::timeout;
    out.error = out.timed_out ? "no response within timeouts.first_byte (" +
                                    std::to_string(cfg.timeouts.first_byte.count()) + "ms)"
                              : wec.message();
    co_return out;
  }
}

// Watches the client while an attempt runs, without a read: a readiness wait costs no system
// call until something happens. If the client went away, the upstream exchange is aborted so
// the backend stops generating for nobody. Pipelined bytes just end the watch (the client is
// alive); they stay in the socket for the next request.
void watch_client(tcp::socket& client, std::shared_ptr<AttemptContext> ctx) {
  client.async_wait(tcp::socket::wait_read, [&client, ctx](const beast::error_code& ec) {
    if (ec || ctx->finished) return;  // `client` may be gone once the attempt finished
    char byte = 0;
    const auto n = ::recv(client.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) return;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      watch_client(client, ctx);  // a spurious wake-up
      return;
    }
    ctx->client_gone = true;
    if (ctx->connection != nullptr) {
      beast::error_code ignored;
      ctx->connection->stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
      ctx->connection->stream.socket().close(ignored);
    }
  });
}

net::awaitable<AttemptOutcome> attempt_watched(Worker* w, discovery::Backend* backend,
                                               beast::tcp_stream* client, Request* req,
                                               std::string* request_head, bool client_keep_alive,
                                               const std::string* request_id,
                                               Clock::time_point started) {
  auto ctx = std::make_shared<AttemptContext>();
  watch_client(client->socket(), ctx);
  auto out = co_await run_attempt(w, backend, ctx.get(), client, req, request_head, client_keep_alive,
                                  request_id, started);
  ctx->finished = true;
  beast::error_code ignored;
  client->socket().cancel(ignored);  // ends the readiness wait; nothing else is pending on it
  if (ctx->client_gone && out.kind == AttemptOutcome::kFailed) out.kind = AttemptOutcome::kClientGone;
  co_return out;
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
    case AttemptOutcome::kClientGone:
      return;  // says nothing about the backend
  }
  if (failed && !out.error.empty()) backend.set_last_error(out.error);
  if (state.health != nullptr) state.health->report(backend.shared_from_this(), failed);
}

// Proxies one request, retrying on other backends while nothing reached the client.
// Returns whether the client connection may carry another request.
net::awaitable<bool> proxy_request(Worker* w, beast::tcp_stream* client, Request* req,
                                   std::string request_id, std::string client_ip) {
  GatewayState& state = *w->state;
  const auto started = Clock::now();
  const bool client_keep_alive = req->keep_alive();
  const unsigned version = req->version();
  const std::string target(req->target());
  const std::string method(req->method_string());

  // Rewrite the request for the backend in place: no copy of the (possibly large) body.
  strip_hop_by_hop(req->base());
  req->erase(http::field::expect);  // the gateway already has the whole body
  req->set("X-Request-ID", request_id);
  auto forwarded = req->find("X-Forwarded-For");
  if (forwarded != req->end()) {
    req->set("X-Forwarded-For", std::string(forwarded->value()) + ", " + client_ip);
  } else {
    req->set("X-Forwarded-For", client_ip);
  }
  req->version(11);
  req->keep_alive(true);
  req->prepare_payload();

  auto set = state.registry.snapshot();
  if (set->routable.empty()) {
    LocalResponse r;
    if (set->all.empty()) {
      r = error_response(503,
                         "no inference backends are configured: " + state.discovery_how);
      r.headers.emplace_back("Retry-After", "5");
    } else {
      r = error_response(503,
                         "none of the " + std::to_string(set->all.size()) +
                             " backends is healthy yet; retry shortly");
      r.headers.emplace_back("Retry-After", "1");
    }
    if (state.config.log.access) {
      spdlog::info("{} {} {} -> - 503 no backend", request_id, method, target);
    }
    co_return co_await write_local_counted(&state, client, std::move(r), version, client_keep_alive, request_id);
  }

  std::vector<const discovery::Backend*> tried;
  std::string request_head;
  std::string failures;
  bool last_timed_out = false;
  discovery::Backend* previous = nullptr;
  const int max_attempts = state.config.retries.max + 1;
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    discovery::Backend* backend = state.registry.pick(*set, tried);
    if (backend == nullptr) break;
    if (attempt > 0) {
      previous->stats.retries.fetch_add(1, std::memory_order_relaxed);
      std::uniform_real_distribution<double> unit(0.0, 1.0);
      net::steady_timer pause(w->io, state.retry.backoff(attempt, unit(w->rng)));
      co_await pause.async_wait(kTuple);
    }
    tried.push_back(backend);
    previous = backend;
    AttemptOutcome out;
    {
      InflightGuard backend_inflight(backend->stats.inflight);
      out = co_await attempt_watched(w, backend, client, req, &request_head,
                                     client_keep_alive, &request_id, started);
    }
    record_attempt(state, *backend, out, started);
    const auto& id = backend->info().id;
    if (out.kind != AttemptOutcome::kFailed) {
      if (out.status != 0) state.count_response(out.status);
      if (out.kind == AttemptOutcome::kBrokenMidResponse) {
        spdlog::warn("{} {} {}: backend {} broke the response after it started: {}", request_id,
                     method, target, id, out.error);
      }
      if (state.config.log.access) {
        auto ms = std::chrono::duration<double, std::milli>(Clock::now() - started).count();
        spdlog::info("{} {} {} -> {} {} {}B {:.1f}ms retries={}{}", request_id, method, target, id,
                     out.status, out.bytes, ms, attempt,
                     out.kind == AttemptOutcome::kClientGone ? " client-gone" : "");
      }
      co_return out.kind == AttemptOutcome::kServed && out.keep_alive;
    }
    spdlog::warn("{} {} {}: attempt {} on {} failed: {}", request_id, method, target, attempt + 1,
                 id, out.error);
    failures += (failures.empty() ? "" : ", ") + id + " (" + out.error + ")";
    last_timed_out = out.timed_out;
  }

  const unsigned status = last_timed_out ? 504 : 502;
  auto message = "no backend could serve the request after " + std::to_string(tried.size()) +
                 " attempt(s): " + failures;
  if (state.config.log.access) {
    spdlog::info("{} {} {} -> - {} {}", request_id, method, target, status, message);
  }
  co_return co_await write_local_counted(&state, client, error_response(status, message), version,
                                         client_keep_alive, request_id);
}

// One broadcast request to one backend on a fresh connection.
net::awaitable<void> broadcast_one(Worker* w, std::shared_ptr<discovery::Backend> backend,
                                   std::shared_ptr<const BroadcastRequest> request,
                                   std::shared_ptr<std::vector<BroadcastResult>> results,
                                   std::size_t slot, std::shared_ptr<std::size_t> remaining,
                                   std::shared_ptr<net::steady_timer> done) {
  auto& result = (*results)[slot];
  result.backend = backend->info().id;
  UpstreamConnection conn(w->io.get_executor());
  auto ec = co_await connect_upstream(w, backend.get(), &conn);
  if (!ec) {
    http::request<http::string_body> req{http::string_to_verb(request->method), request->path, 11};
    req.set(http::field::host, backend->info().id);
    req.set(http::field::content_type, "application/json");
    req.body() = request->body;
    req.prepare_payload();
    conn.stream.expires_after(w->state->config.timeouts.first_byte);
    auto [wec, wn] = co_await http::async_write(conn.stream, req, kTuple);
    ec = wec;
    if (!ec) {
      http::response_parser<http::string_body> parser;
      parser.body_limit(8 * 1024 * 1024);
      auto [rec, rn] = co_await http::async_read(conn.stream, conn.buffer, parser, kTuple);
      ec = rec;
      if (!ec) {
        result.status = parser.get().result_int();
        result.body = std::move(parser.get().body());
      }
    }
  }
  if (ec) result.error = ec == beast::error::timeout ? "timeout" : ec.message();
  if (--*remaining == 0) done->cancel();
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
  if (targets.empty()) co_return *results;
  auto shared_request = std::make_shared<const BroadcastRequest>(std::move(request));
  auto remaining = std::make_shared<std::size_t>(targets.size());
  auto done = std::make_shared<net::steady_timer>(w->io, Clock::time_point::max());
  for (std::size_t i = 0; i < targets.size(); ++i) {
    net::co_spawn(w->io, broadcast_one(w, targets[i], shared_request, results, i, remaining, done),
                  net::detached);
  }
  if (*remaining > 0) co_await done->async_wait(kTuple);  // cancelled by the last one to finish
  spdlog::info("broadcast {} {} to {} backend(s)", shared_request->method, shared_request->path,
               targets.size());
  co_return *results;
}

// Maps a request-read failure to the answer the client gets before the connection closes.
std::optional<LocalResponse> read_error_response(const beast::error_code& ec) {
  if (ec == http::error::body_limit) {
    return error_response(413,
                          "request body exceeds limits.max_body");
  }
  if (ec == http::error::header_limit) {
    return error_response(431,
                          "request header exceeds limits.max_header");
  }
  if (ec == http::error::end_of_stream || ec == http::error::partial_message) return std::nullopt;
  if (ec.category() == http::make_error_code(http::error::bad_method).category()) {
    return error_response(400, "malformed HTTP request: " + ec.message());
  }
  return std::nullopt;  // a transport error or timeout: nobody to answer
}

// After an error answer, the client may still be sending (a body over the limit): read and
// discard for a moment so closing does not reset the connection before it reads the answer.
net::awaitable<void> drain_before_close(beast::tcp_stream* client, beast::flat_buffer* buffer) {
  beast::error_code ignored;
  client->socket().shutdown(tcp::socket::shutdown_send, ignored);
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  std::size_t drained = 0;
  while (Clock::now() < deadline && drained < 256 * 1024 * 1024) {
    buffer->clear();
    client->expires_at(deadline);
    auto [ec, n] = co_await client->async_read_some(buffer->prepare(64 * 1024), kTuple);
    if (ec) break;
    drained += n;
  }
}

}  // namespace

net::awaitable<void> run_client_session(Worker* w, tcp::socket socket, Listener listener) {
  GatewayState& state = *w->state;
  const auto& cfg = state.config;
  state.client_connections.fetch_add(1, std::memory_order_relaxed);
  struct ConnectionCount {
    GatewayState& s;
    ~ConnectionCount() { s.client_connections.fetch_sub(1, std::memory_order_relaxed); }
  } connection_count{state};

  beast::error_code ec;
  socket.set_option(tcp::no_delay(true), ec);
  auto remote = socket.remote_endpoint(ec);
  const std::string client_ip = ec ? std::string("unknown") : remote.address().to_string();
  beast::tcp_stream client(std::move(socket));
  beast::flat_buffer buffer;

  try {
    for (;;) {
      if (state.stopping.load(std::memory_order_relaxed)) break;
      http::request_parser<http::string_body> parser;
      parser.header_limit(static_cast<std::uint32_t>(cfg.limits.max_header));
      parser.body_limit(cfg.limits.max_body);
      client.expires_after(buffer.size() == 0 ? cfg.timeouts.client_idle : cfg.timeouts.client_header);
      auto [hec, hn] = co_await http::async_read_header(client, buffer, parser, kTuple);
      if (!hec && parser.get()[http::field::expect] == "100-continue" && !parser.is_done()) {
        // Clients holding back a large body until told to send it (curl does above 1 MiB).
        http::response<http::empty_body> cont{http::status::continue_, 11};
        co_await http::async_write(client, cont, kTuple);
      }
      if (!hec && !parser.is_done()) {
        // Room for the whole body up front: otherwise Beast reads it 512 bytes at a time
        // (a 32 KiB prompt took 64 system calls).
        const auto expected = parser.content_length().value_or(64 * 1024);
        buffer.reserve(buffer.size() + static_cast<std::size_t>(std::min<std::uint64_t>(expected, cfg.limits.max_body)));
        client.expires_after(cfg.timeouts.idle);
        auto [bec, bn] = co_await http::async_read(client, buffer, parser, kTuple);
        hec = bec;
      }
      if (hec) {
        if (auto answer = read_error_response(hec)) {
          co_await write_local(&client, std::move(*answer), 11, false, "");
          co_await drain_before_close(&client, &buffer);
        }
        break;
      }

      Request req = parser.release();
      InflightGuard inflight(state.inflight_requests);
      bool keep_alive = false;
      RouteDecision decision;
      const auto path = req.target().substr(0, req.target().find('?'));
      if (listener == Listener::kMetricsOnly && path != "/metrics" && path != "/health") {
        decision = error_response(404, "this listener (metrics.listen) serves /metrics and /health only");
      } else {
        decision = route(state, RequestView{req.method_string(), req.target(),
                                            req[http::field::authorization], req.body()});
      }
      if (auto* local = std::get_if<LocalResponse>(&decision)) {
        keep_alive = co_await write_local(&client, std::move(*local), req.version(),
                                          req.keep_alive(), "");
      } else if (auto* broadcast = std::get_if<BroadcastRequest>(&decision)) {
        auto answer = broadcast_response(co_await run_broadcast(w, std::move(*broadcast)));
        keep_alive = co_await write_local(&client, std::move(answer), req.version(), req.keep_alive(), "");
      } else {
        auto id = req["X-Request-ID"];
        std::string request_id = id.empty() || id.size() > 200 ? make_request_id(*w) : std::string(id);
        keep_alive = co_await proxy_request(w, &client, &req, std::move(request_id), client_ip);
      }
      if (!keep_alive) break;
      if (buffer.size() == 0 && buffer.capacity() > 256 * 1024) buffer.shrink_to_fit();  // after a huge prompt
    }
  } catch (const std::exception& e) {
    spdlog::debug("client session ended: {}", e.what());
  }
  beast::error_code ignored;
  client.socket().shutdown(tcp::socket::shutdown_send, ignored);
  client.socket().close(ignored);
}

}  // namespace infergate::gateway
