// The proxy end to end: real infergate and infergate-mock processes on loopback ports.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <cstring>
#include <fstream>
#include <sstream>
#include <signal.h>
#include <sys/resource.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <poll.h>
#include <unistd.h>

#include <regex>
#include <set>
#include <atomic>
#include <mutex>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "harness.hpp"

using namespace infergate::test;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;
using json = nlohmann::json;

namespace {

std::vector<std::string> backend_args(const std::vector<Mock>& mocks) {
  std::vector<std::string> args;
  for (const auto& m : mocks) {
    args.push_back("--backend");
    args.push_back(m.url());
  }
  return args;
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

int healthy_count(int port) {
  auto r = http_request(port, "GET", "/ready");
  if (r.status == 0) return -1;
  auto j = json::parse(r.body, nullptr, false);
  return j.is_object() && j.contains("healthy") ? j["healthy"].get<int>() : -1;
}

void wait_healthy(const Gateway& g, int n) {
  ASSERT_TRUE(poll_until([&] { return healthy_count(g.port) == n; }, 10s))
      << "backends did not become healthy; gateway stderr:\n"
      << g.process->errors();
}

std::vector<Mock> start_mocks(int n, const std::vector<std::string>& args = {}) {
  std::vector<Mock> mocks;
  for (int i = 0; i < n; ++i) mocks.push_back(start_mock(args));
  return mocks;
}

// Completion requests the mocks received, all told.
int requests_received(const std::vector<Mock>& mocks) {
  int n = 0;
  for (const auto& m : mocks) n += json::parse(http_request(m.port, "GET", "/mock/stats").body)["requests"].get<int>();
  return n;
}

// The gateway's in-flight gauge for a mock on 127.0.0.1.
double inflight_on(int port, const Mock& mock) {
  return metric(port, "infergate_backend_inflight", "backend=\"" + mock.id() + "\",node=\"127.0.0.1\",slot=\"0\"");
}

}  // namespace

TEST(ProxyTest, RoundRobinIsAnExactRotation) {
  auto mocks = start_mocks(4);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 4);
  std::vector<std::string> seen;
  for (int i = 0; i < 12; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.error << r.body;
    seen.push_back(r.header("X-Backend"));
  }
  std::size_t start = 0;
  while (start < 4 && mocks[start].id() != seen[0]) ++start;
  ASSERT_LT(start, 4u) << "unknown backend " << seen[0];
  for (std::size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i], mocks[(start + i) % 4].id()) << "request " << i;
  }
}

TEST(ProxyTest, BodiesAreByteIdenticalToADirectRequest) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  const Headers id{{"X-Request-ID", "same-id"}};
  for (auto path : {"/v1/chat/completions", "/v1/completions"}) {
    std::string body = std::string(path) == "/v1/completions"
                           ? R"({"model":"mock-model","prompt":"hello there","n":2})"
                           : chat_body(false, R"("n":2)");
    auto direct = http_request(mocks[0].port, "POST", path, body, id);
    auto proxied = http_request(gw.port, "POST", path, body, id);
    ASSERT_EQ(direct.status, 200);
    ASSERT_EQ(proxied.status, 200) << proxied.error;
    EXPECT_EQ(proxied.body, direct.body) << path;
    EXPECT_EQ(proxied.header("X-Request-ID"), "same-id");
  }
  auto direct = http_stream(mocks[0].port, "POST", "/v1/chat/completions",
                            chat_body(true, R"("stream_options":{"include_usage":true})"));
  // Streams through the gateway carry the same id when the client sends X-Request-ID; use the
  // raw client to send it.
  auto stream_request = [&](int port) {
    std::string body = chat_body(true, R"("stream_options":{"include_usage":true})");
    return raw_exchange(port,
                        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        "X-Request-ID: same-id\r\nConnection: close\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  auto strip_head = [](const std::string& raw) { return raw.substr(raw.find("\r\n\r\n") + 4); };
  auto direct_raw = stream_request(mocks[0].port);
  auto proxied_raw = stream_request(gw.port);
  ASSERT_THAT(direct_raw, HasSubstr("data: [DONE]"));
  // Chunk boundaries may differ; compare the de-chunked event streams.
  auto dechunk = [](std::string body) {
    std::string out;
    std::size_t pos = 0;
    while (pos < body.size()) {
      auto eol = body.find("\r\n", pos);
      auto size = std::stoul(body.substr(pos, eol - pos), nullptr, 16);
      if (size == 0) break;
      out += body.substr(eol + 2, size);
      pos = eol + 2 + size + 2;
    }
    return out;
  };
  EXPECT_EQ(dechunk(strip_head(proxied_raw)), dechunk(strip_head(direct_raw)));
  EXPECT_THAT(dechunk(strip_head(proxied_raw)), HasSubstr("\"usage\""));

  // Large request bodies pass through unchanged (1 MiB, binary-safe).
  std::string big(1 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 7919) % 251);
  auto echoed = http_request(gw.port, "POST", "/echo", big, {{"Content-Type", "application/octet-stream"}});
  ASSERT_EQ(echoed.status, 200) << echoed.error;
  EXPECT_TRUE(echoed.body == big);
}

TEST(ProxyTest, StreamsEventsAsTheyArrive) {
  auto mocks = start_mocks(1, {"--token-delay-ms", "300", "--tokens", "2"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  auto r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true));
  ASSERT_EQ(r.status, 200) << r.error;
  ASSERT_TRUE(r.complete);
  EXPECT_EQ(r.headers["content-type"], "text/event-stream");
  ASSERT_GE(r.chunks.size(), 2u);
  // The mock sends the first token, waits 300 ms, sends the second: the first must have
  // reached the client before the second was sent.
  auto first_token = std::find_if(r.chunks.begin(), r.chunks.end(),
                                  [](const auto& c) { return c.data.find("tok0") != std::string::npos; });
  auto last_token = std::find_if(r.chunks.begin(), r.chunks.end(),
                                 [](const auto& c) { return c.data.find("tok1") != std::string::npos; });
  ASSERT_NE(first_token, r.chunks.end());
  ASSERT_NE(last_token, r.chunks.end());
  EXPECT_GE(last_token->at - first_token->at, 250ms);
  EXPECT_THAT(r.body(), HasSubstr("data: [DONE]"));
}

namespace {
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;

struct StreamTally {
  int ok = 0;
  int bad = 0;
  std::string last_error;
};

net::awaitable<void> one_stream(int port, std::string body, StreamTally* tally) {
  auto ex = co_await net::this_coro::executor;
  beast::tcp_stream stream(ex);
  stream.expires_after(60s);
  auto [cec] = co_await stream.async_connect(
      net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)),
      net::as_tuple(net::use_awaitable));
  if (cec) {
    ++tally->bad;
    tally->last_error = cec.message();
    co_return;
  }
  http::request<http::string_body> req{http::verb::post, "/v1/chat/completions", 11};
  req.set(http::field::host, "x");
  req.set(http::field::content_type, "application/json");
  req.body() = body;
  req.prepare_payload();
  co_await http::async_write(stream, req, net::as_tuple(net::use_awaitable));
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  auto [rec, n] = co_await http::async_read(stream, buffer, res, net::as_tuple(net::use_awaitable));
  std::size_t events = 0;
  for (std::size_t pos = 0; (pos = res.body().find("data: {", pos)) != std::string::npos; ++pos) ++events;
  // 1 role chunk + 8 tokens + 1 final chunk, then [DONE].
  if (!rec && res.result_int() == 200 && events == 10 && res.body().ends_with("data: [DONE]\n\n")) {
    ++tally->ok;
  } else {
    ++tally->bad;
    tally->last_error = rec ? rec.message() : "status " + std::to_string(res.result_int()) + " events " + std::to_string(events);
  }
}
}  // namespace

TEST(ProxyTest, ThousandConcurrentStreamsAllComplete) {
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  ASSERT_GE(limit.rlim_cur, 2048u) << "this test needs at least 2048 file descriptors";
  auto mocks = start_mocks(4, {"--tokens", "8", "--token-delay-ms", "20"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 4);
  net::io_context io;
  StreamTally tally;
  for (int i = 0; i < 1000; ++i) net::co_spawn(io, one_stream(gw.port, chat_body(true), &tally), net::detached);
  io.run();
  EXPECT_EQ(tally.ok, 1000) << tally.bad << " failed, last: " << tally.last_error;
  // The gateway counts a request once its last byte is sent, a moment after the client has it.
  EXPECT_TRUE(poll_until(
      [&] {
        auto metrics = http_request(gw.port, "GET", "/metrics").body;
        return metrics.find("infergate_requests_total{code=\"2xx\"} 1000\n") != std::string::npos;
      },
      5s));
}

TEST(ProxyTest, RetriesOnAnotherBackendWhenConnectIsRefused) {
  auto good = start_mocks(1);
  auto dead = start_mock();
  const auto dead_url = dead.url();
  auto gw = start_gateway(concat(backend_args(good), {"--backend", dead_url, "--set", "health.interval=1h"}));
  wait_healthy(gw, 2);
  dead.process->kill();  // the gateway still believes it healthy (probes are an hour apart)
  for (int i = 0; i < 6; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Backend"), good[0].id());
  }
}

TEST(ProxyTest, RetriesOn503AndAnswers503WithRetryAfterWhenEveryBackendIsUnavailable) {
  auto failing = start_mocks(1, {"--fail-rate", "1", "--fail-status", "503", "--retry-after", "7"});
  auto failing_quiet = start_mocks(1, {"--fail-rate", "1", "--fail-status", "503"});
  auto good = start_mocks(1);
  const std::vector<std::string> keep{"--set", "passive.failures=1000"};
  auto gw = start_gateway(concat(backend_args(failing), concat(backend_args(failing_quiet),
                                                               concat(backend_args(good), keep))));
  wait_healthy(gw, 3);
  for (int i = 0; i < 6; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Backend"), good[0].id());
  }
  good[0].process->kill();
  // Every backend says "unavailable": so does the gateway, with the longest Retry-After asked.
  auto gw2 = start_gateway(concat(backend_args(failing), concat(backend_args(failing_quiet), keep)));
  wait_healthy(gw2, 2);
  auto r = http_request(gw2.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.header("Retry-After"), "7");
  auto j = json::parse(r.body);
  EXPECT_EQ(j["error"]["code"], 503);
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(failing[0].id()));
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(failing_quiet[0].id()));
  // None gives a Retry-After: the client still gets one.
  auto gw3 = start_gateway(concat(backend_args(failing_quiet), keep));
  wait_healthy(gw3, 1);
  r = http_request(gw3.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.header("Retry-After"), "1");
}

TEST(ProxyTest, AnswersBadGatewayNamingEveryBackendTriedWhenOneWasNotJustUnavailable) {
  auto unavailable = start_mocks(1, {"--fail-rate", "1", "--fail-status", "503", "--retry-after", "7"});
  auto bad_gateway = start_mocks(1, {"--fail-rate", "1", "--fail-status", "502"});
  auto gw = start_gateway(concat(backend_args(unavailable),
                                 concat(backend_args(bad_gateway), {"--set", "passive.failures=1000"})));
  wait_healthy(gw, 2);
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 502);
  EXPECT_EQ(r.header("Retry-After"), "");
  auto j = json::parse(r.body);
  EXPECT_EQ(j["error"]["code"], 502);
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(unavailable[0].id()));
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(bad_gateway[0].id()));
}

// A DNS server that stops answering for a backend's host: the lookup counts against
// timeouts.connect like the connect itself, so the request is retried on another backend
// instead of waiting on getaddrinfo. (The shim answers the health checker's first lookup, so
// the backend is healthy, and hangs every later one.)
namespace {
// The gateway's environment for a resolver that answers the first lookup of dns-hangs.test (the
// health checker's) and hangs every later one.
std::vector<std::string> hanging_dns_env() {
  std::string asan = std::getenv("ASAN_OPTIONS") != nullptr ? std::getenv("ASAN_OPTIONS") : "";
  return {"LD_PRELOAD=" INFERGATE_HANGING_RESOLVER, "IG_TEST_HANG_HOST=dns-hangs.test", "IG_TEST_HANG_AFTER=1",
          "ASAN_OPTIONS=" + asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"};
}

// A gateway whose one backend, `mock`, is named dns-hangs.test, with `settings` as --set flags
// (and passive health off).
Gateway start_gateway_behind_hanging_dns(const Mock& mock, const std::vector<std::string>& settings) {
  std::vector<std::string> args{"--backend", "http://dns-hangs.test:" + std::to_string(mock.port), "--set",
                                "passive.failures=1000"};
  for (const auto& setting : settings) args.insert(args.end(), {"--set", setting});
  return start_gateway(args, hanging_dns_env());
}
}  // namespace

TEST(ProxyTest, AHangingDnsLookupIsAConnectTimeoutAndRetriedElsewhere) {
  auto unresolvable = start_mock();
  auto good = start_mocks(1);
  auto gw = start_gateway(
      concat({"--backend", "http://dns-hangs.test:" + std::to_string(unresolvable.port)},
             concat(backend_args(good), {"--set", "timeouts.connect=400ms", "--set", "passive.failures=1000"})),
      hanging_dns_env());
  wait_healthy(gw, 2);
  for (int i = 0; i < 4; ++i) {
    const auto started = Clock::now();
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 10s);
    ASSERT_EQ(r.status, 200) << r.error << r.body;
    EXPECT_EQ(r.header("X-Backend"), good[0].id());
    EXPECT_LT(Clock::now() - started, 3s);
  }
  EXPECT_TRUE(poll_until(
      [&] { return gw.process->errors().find("DNS lookup of dns-hangs.test did not finish") != std::string::npos; },
      5s))
      << gw.process->errors();
  // Exiting does not wait for the unanswered lookups either.
  const auto stopping = Clock::now();
  EXPECT_EQ(gw.process->signal_and_wait(SIGTERM, 10s), 0);
  EXPECT_LT(Clock::now() - stopping, 3s);
}

// timeouts.total bounds the lookup too: a request whose only backend's DNS hangs is answered
// when its total time is up, not when the (longer) connect timeout would end the lookup.
TEST(ProxyTest, AHangingDnsLookupEndsAtTimeoutsTotal) {
  auto unresolvable = start_mock();
  auto gw = start_gateway_behind_hanging_dns(unresolvable, {"timeouts.connect=5s", "timeouts.total=400ms"});
  wait_healthy(gw, 1);
  const auto started = Clock::now();
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 15s);
  EXPECT_LT(Clock::now() - started, 2s);
  EXPECT_EQ(r.status, 504) << r.error << r.body;
  EXPECT_THAT(r.body, HasSubstr("timeouts.total (400ms)"));
}

TEST(ProxyTest, RetriesAfterResetBeforeAnyResponseByte) {
  auto dropping = start_mocks(1, {"--drop-request"});
  auto good = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(dropping), concat(backend_args(good), {"--set", "passive.failures=1000"})));
  wait_healthy(gw, 2);
  for (int i = 0; i < 4; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Backend"), good[0].id());
  }
}

TEST(ProxyTest, FirstByteTimeoutRetriesThenAnswers504) {
  auto hanging = start_mocks(1, {"--hang"});
  auto only_hanging = start_gateway(concat(backend_args(hanging), {"--set", "timeouts.first_byte=300ms",
                                                                   "--set", "health.path=/mock/stats",
                                                                   "--set", "retries.max=1"}));
  wait_healthy(only_hanging, 1);
  auto started = Clock::now();
  auto t = http_request(only_hanging.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(t.status, 504) << t.body << t.error;
  EXPECT_LT(Clock::now() - started, 3s);
  EXPECT_THAT(t.body, HasSubstr("timeouts.first_byte"));
}

TEST(ProxyTest, FirstByteTimeoutMovesToAHealthyBackend) {
  auto hanging = start_mocks(1, {"--hang"});
  auto good = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(hanging), concat(backend_args(good), {
                                     "--set", "timeouts.first_byte=300ms", "--set", "health.path=/mock/stats",
                                     "--set", "passive.failures=1000"})));
  wait_healthy(gw, 2);
  for (int i = 0; i < 4; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Backend"), good[0].id());
  }
}

// A backend that sends a response head and dies before the first byte of the body (a stream's
// first event: it crashed in the prefill) has an ordinary failed attempt: the request is retried
// on another backend and the client gets a whole answer, not a 200 cut before it began. With
// retries.after_sent=false it is not sent again: 502.
TEST(ProxyTest, AResponseThatDiesBeforeItsFirstByteIsRetried) {
  auto dying = start_mocks(1, {"--drop-after-header"});
  auto good = start_mocks(1);
  auto gw = start_gateway(concat(concat(backend_args(dying), backend_args(good)), {"--set", "passive.failures=100"}));
  wait_healthy(gw, 2);
  for (int i = 0; i < 4; ++i) {  // round robin: half of them start on the dying backend
    SCOPED_TRACE("request " + std::to_string(i));
    auto streamed = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 5s);
    EXPECT_EQ(streamed.status, 200);
    EXPECT_TRUE(streamed.complete);
    EXPECT_THAT(streamed.body(), HasSubstr("data: [DONE]"));
    auto whole = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    EXPECT_EQ(whole.status, 200) << whole.body;
    EXPECT_TRUE(json::parse(whole.body, nullptr, false).contains("choices")) << whole.body;
  }
  auto gw_once = start_gateway(concat(backend_args(dying), {"--set", "retries.after_sent=false"}));
  wait_healthy(gw_once, 1);
  auto r = http_stream(gw_once.port, "POST", "/v1/chat/completions", chat_body(true), 5s);
  EXPECT_EQ(r.status, 502) << r.body();
  EXPECT_THAT(r.body(), HasSubstr("not retried (retries.after_sent is false)"));
}

// A stream whose backend stalls after its head (before any event) times out after
// timeouts.idle with nothing sent to the client: 504, not a 200 cut before it began. One that
// stalls after its first event is cut (the client has part of it).
TEST(ProxyTest, IdleTimeoutEndsAStalledResponse) {
  auto stalled = start_mocks(1, {"--hang-after-header"});
  auto gw = start_gateway(concat(backend_args(stalled), {"--set", "timeouts.idle=300ms"}));
  wait_healthy(gw, 1);
  auto started = Clock::now();
  auto r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 5s);
  EXPECT_EQ(r.status, 504) << r.body();
  EXPECT_THAT(r.body(), HasSubstr("no bytes within timeouts.idle"));
  EXPECT_LT(Clock::now() - started, 3s);
  EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);  // still serving

  auto slow = start_mocks(1, {"--tokens", "3", "--token-delay-ms", "2000"});
  auto gw_slow = start_gateway(concat(backend_args(slow), {"--set", "timeouts.idle=300ms"}));
  wait_healthy(gw_slow, 1);
  auto cut = http_stream(gw_slow.port, "POST", "/v1/chat/completions", chat_body(true), 5s);
  EXPECT_EQ(cut.status, 200);
  EXPECT_FALSE(cut.complete);
  EXPECT_THAT(cut.body(), HasSubstr("data: "));
}

// The body of a raw answer (after its head), parsed as JSON.
json raw_answer_json(const std::string& raw) {
  const auto body_at = raw.find("\r\n\r\n");
  if (body_at == std::string::npos) return json();
  return json::parse(raw.substr(body_at + 4), nullptr, false);
}

// A client that leaves in the middle of a request's head or body gets no answer (it is gone),
// but the access log says the request came.
TEST(ProxyTest, AClientLeavingMidRequestIsInTheAccessLog) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  {
    RawConnection client(gw.port);
    ASSERT_TRUE(client.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"));
  }
  EXPECT_TRUE(poll_until([&] { return gw.process->errors().find("left in the middle of a request's head") != std::string::npos; }, 5s))
      << gw.process->errors();
  // The body's bytes that came are counted, not the head's; of a chunked body, the decoded ones.
  {
    RawConnection client(gw.port);
    ASSERT_TRUE(client.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":"));
  }
  EXPECT_TRUE(poll_until([&] { return gw.process->errors().find("a request's body (5 bytes of it came") != std::string::npos; }, 5s))
      << gw.process->errors();
  {
    RawConnection client(gw.port);
    ASSERT_TRUE(client.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "7\r\n{\"a\":1,\r\n"));
  }
  EXPECT_TRUE(poll_until([&] { return gw.process->errors().find("a request's body (7 bytes of it came") != std::string::npos; }, 5s))
      << gw.process->errors();
  EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);
}

// A streamed response's access line says how many retries came before it, as every other
// does, and one the backend broke says so (the client got a broken response, not a whole one).
TEST(ProxyTest, AccessLinesOfStreamsCountRetriesAndNameBrokenResponses) {
  auto failing = start_mocks(1, {"--fail-rate", "1", "--fail-status", "502"});
  auto good = start_mocks(1, {"--tokens", "4"});
  auto gw = start_gateway(concat(concat(backend_args(failing), backend_args(good)),
                                 {"--threads", "1", "--set", "passive.failures=1000"}));
  wait_healthy(gw, 2);
  for (int i = 0; i < 2; ++i) {  // round robin: one of the two starts on the failing backend
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(true));
    ASSERT_EQ(r.status, 200) << r.body;
  }
  const std::regex retried(" -> " + good[0].id() + " 200 [0-9]+B [0-9.]+ms retries=1\n");
  EXPECT_TRUE(poll_until([&] { return std::regex_search(gw.process->errors(), retried); }, 5s)) << gw.process->errors();

  auto breaking = start_mocks(1, {"--drop-mid-stream"});
  auto gw_broken = start_gateway(concat(backend_args(breaking), {"--set", "passive.failures=1000"}));
  wait_healthy(gw_broken, 1);
  http_request(gw_broken.port, "POST", "/v1/chat/completions", chat_body(true));
  const std::regex broke(" -> " + breaking[0].id() + " 200 [0-9]+B [0-9.]+ms retries=0 backend-broke\n");
  EXPECT_TRUE(poll_until([&] { return std::regex_search(gw_broken.process->errors(), broke); }, 5s))
      << gw_broken.process->errors();
}

// A client that stops halfway through a request is told why (408) before the close; one that
// sends nothing is closed without a word.
TEST(ProxyTest, ClientTimeoutsCloseIdleAndSlowConnections) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "timeouts.client_header=300ms",
                                                       "--set", "timeouts.client_idle=300ms",
                                                       "--set", "timeouts.idle=300ms"}));
  wait_healthy(gw, 1);
  auto started = Clock::now();
  auto partial = raw_exchange(gw.port, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", 5s);
  EXPECT_THAT(partial, StartsWith("HTTP/1.1 408 "));  // well before the client's own deadline
  EXPECT_THAT(partial, HasSubstr("Connection: close\r\n"));
  const auto head_error = raw_answer_json(partial);
  ASSERT_TRUE(head_error.is_object()) << partial;
  EXPECT_EQ(head_error["error"]["code"], 408);
  EXPECT_THAT(head_error["error"]["message"].get<std::string>(), HasSubstr("timeouts.client_header (300ms)"));
  EXPECT_LT(Clock::now() - started, 3s);

  started = Clock::now();
  auto half_body = raw_exchange(gw.port,
                                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                "Content-Length: 100\r\n\r\n{\"model\":",
                                5s);
  EXPECT_THAT(half_body, StartsWith("HTTP/1.1 408 "));
  const auto body_error = raw_answer_json(half_body);
  ASSERT_TRUE(body_error.is_object()) << half_body;
  EXPECT_THAT(body_error["error"]["message"].get<std::string>(), HasSubstr("timeouts.idle (300ms)"));
  EXPECT_LT(Clock::now() - started, 3s);

  started = Clock::now();
  auto idle = raw_exchange(gw.port, "", 5s);
  EXPECT_EQ(idle, "");
  EXPECT_LT(Clock::now() - started, 3s);
  // Answered after a whole request, then idle: closed without a word as well.
  auto answered = raw_exchange(gw.port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 5s);
  EXPECT_THAT(answered, StartsWith("HTTP/1.1 200 "));
  EXPECT_EQ(answered.find("HTTP/1.1 408"), std::string::npos) << answered;
  // None of it reached a backend, and the 408s count as the gateway's answers and are logged.
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"4xx\""), 2);
  EXPECT_THAT(gw.process->errors(),
              HasSubstr("- - - -> - 408 the request head did not arrive whole within timeouts.client_header (300ms) "
                        "(client 127.0.0.1)"));
}

TEST(ProxyTest, BadRequestsGetClearErrors) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "limits.max_body=1KiB", "--set", "limits.max_header=2KiB"}));
  wait_healthy(gw, 1);

  auto too_big = http_request(gw.port, "POST", "/v1/chat/completions", std::string(4096, 'x'));
  EXPECT_EQ(too_big.status, 413);
  EXPECT_THAT(too_big.body, HasSubstr("limits.max_body"));
  EXPECT_EQ(json::parse(too_big.body)["error"]["code"], 413);

  auto big_header = http_request(gw.port, "GET", "/v1/models", "", {{"X-Big", std::string(4096, 'a')}});
  EXPECT_EQ(big_header.status, 431);
  EXPECT_THAT(big_header.body, HasSubstr("request header exceeds limits.max_header"));
  auto long_target = http_request(gw.port, "GET", "/v1/models?q=" + std::string(4096, 'a'));
  EXPECT_EQ(long_target.status, 414);
  EXPECT_THAT(long_target.body, HasSubstr("request target exceeds limits.max_header"));

  auto malformed = raw_exchange(gw.port, "GARBAGE\r\n\r\n");
  EXPECT_THAT(malformed, HasSubstr("HTTP/1.1 400"));
  EXPECT_THAT(malformed, HasSubstr("\"error\""));
  auto fragment = raw_exchange(gw.port, "GET /v1/models#x HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(fragment, StartsWith("HTTP/1.1 400 "));
  EXPECT_THAT(fragment, HasSubstr("\"error\""));
  EXPECT_THAT(fragment, HasSubstr("fragment in the request target"));

  auto smuggling = raw_exchange(gw.port,
                                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
  EXPECT_THAT(smuggling, HasSubstr("HTTP/1.1 400"));

  // Bad JSON is the backend's to judge: forwarded, and its 400 comes back unchanged.
  auto bad_json = http_request(gw.port, "POST", "/v1/chat/completions", "{not json");
  EXPECT_EQ(bad_json.status, 400);
  EXPECT_EQ(gw.process->running(), true);
}

TEST(ProxyTest, NoBackendsIs503WithRetryAfterAndSaysHowDiscoveryWasTried) {
  auto gw = start_gateway({});
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 503);
  EXPECT_FALSE(r.header("Retry-After").empty());
  auto j = json::parse(r.body);
  EXPECT_EQ(j["error"]["code"], 503);
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr("Slurm discovery disabled"));
}

TEST(ProxyTest, ClientDisconnectCancelsTheUpstreamRequest) {
  auto mocks = start_mocks(1, {"--tokens", "100", "--token-delay-ms", "100"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  auto r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 10s, 1);
  EXPECT_EQ(r.status, 200);
  auto closed_at = Clock::now();
  bool cancelled = poll_until(
      [&] {
        auto stats = json::parse(http_request(mocks[0].port, "GET", "/mock/stats").body);
        return stats["cancelled"].get<int>() == 1;
      },
      5s);
  EXPECT_TRUE(cancelled);
  EXPECT_LT(Clock::now() - closed_at, 1s);
}

// A client that leaves before any answer came is counted as client_closed, so that the status
// classes and it account for every request read (and the backend is not blamed).
TEST(ProxyTest, AClientGoneBeforeTheAnswerCountsAsClientClosed) {
  auto mocks = start_mocks(1, {"--tokens", "100", "--token-delay-ms", "100"});  // 10 s per answer
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  {
    RawConnection client(gw.port);
    const auto body = chat_body(false);
    ASSERT_TRUE(client.send(raw_chat_request(body)));
    ASSERT_TRUE(poll_until([&] { return inflight_on(gw.port, mocks[0]) == 1; }, 5s));
  }  // the client leaves
  EXPECT_TRUE(poll_until([&] { return metric(gw.port, "infergate_requests_total", "code=\"client_closed\"") == 1; }, 5s))
      << http_request(gw.port, "GET", "/metrics").body;
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"2xx\""), 0);
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"5xx\""), 0);
  const auto listed = json::parse(http_request(gw.port, "GET", "/admin/backends").body);
  EXPECT_EQ(listed["gateway"]["requests"]["client_closed"], 1);
}

// The client is not watched between attempts: one that leaves during the backoff before a retry
// gets no retry (it would be generated for nobody), and is counted as client_closed.
TEST(ProxyTest, AClientGoneDuringTheBackoffGetsNoRetry) {
  auto mocks = start_mocks(2, {"--fail-rate", "1", "--fail-status", "503"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "retries.backoff_base=4s", "--set",
                                                       "retries.backoff_max=4s", "--set", "passive.failures=100"}));
  wait_healthy(gw, 2);
  auto received = [&] { return requests_received(mocks); };
  {
    RawConnection client(gw.port);
    const auto body = chat_body(false);
    ASSERT_TRUE(client.send(raw_chat_request(body)));
    ASSERT_TRUE(poll_until([&] { return received() == 1; }, 5s));  // the first attempt's 503; the backoff (2-4 s) runs
  }  // the client leaves
  EXPECT_TRUE(poll_until([&] { return metric(gw.port, "infergate_requests_total", "code=\"client_closed\"") == 1; }, 8s))
      << http_request(gw.port, "GET", "/metrics").body;
  EXPECT_EQ(received(), 1);
  EXPECT_THAT(gw.process->errors(), HasSubstr("client-gone (before retry 1; not sent again)"));
}

TEST(ProxyTest, BackendKilledMidStreamEndsTheClientStreamPromptly) {
  auto dying = start_mocks(1, {"--tokens", "100", "--token-delay-ms", "50"});
  auto good = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(dying), backend_args(good)));
  wait_healthy(gw, 2);
  std::thread killer([&] {
    std::this_thread::sleep_for(300ms);  // let the stream start: this is the fault being injected
    dying[0].process->kill();
  });
  // Round robin: the first request goes to one of the two; make sure we stream from the dying one.
  StreamResult r;
  for (int i = 0; i < 2; ++i) {
    r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 10s);
    if (r.headers["x-backend"] == dying[0].id()) break;
  }
  killer.join();
  EXPECT_EQ(r.headers["x-backend"], dying[0].id());
  EXPECT_FALSE(r.complete);
  EXPECT_THAT(r.body(), ::testing::Not(HasSubstr("[DONE]")));
  auto after = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(after.status, 200);
}

TEST(ProxyTest, StalePooledConnectionsAreReplacedInvisibly) {
  auto mocks = start_mocks(1, {"--close-after", "1"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1"}));
  wait_healthy(gw, 1);
  for (int i = 0; i < 20; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << "request " << i << ": " << r.body << r.error;
  }
}

// A backend that writes bytes past the response it framed (here: a second "response", 20 ms
// later) has put its connection out of step: it must never carry another request, however soon.
TEST(ProxyTest, AConnectionWithStrayBytesIsNeverReused) {
  auto liar = start_mocks(1, {"--lie", "extra-bytes"});
  auto gw = start_gateway(concat(backend_args(liar), {"--threads", "1"}));
  wait_healthy(gw, 1);
  auto stats = [&] { return json::parse(http_request(liar[0].port, "GET", "/mock/stats").body); };
  for (int i = 0; i < 3; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body << r.error;
    auto j = json::parse(r.body, nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("choices")) << "request " << i << " got: " << r.body;
    // The stray bytes are in the gateway's socket before the next request goes out.
    ASSERT_TRUE(poll_until([&] { return stats()["lies"].get<int>() == i + 1; }, 5s));
  }
  EXPECT_EQ(stats()["requests"], 3);
}

// Content-Length beside chunked framing: the chunks frame the body (RFC 9112), and the client
// must not get both (an HTTP/1.0 client, which gets the body de-chunked, would get a wrong length).
TEST(ProxyTest, AContentLengthBesideChunkedFramingIsDropped) {
  auto liar = start_mocks(1, {"--lie", "cl-and-te"});
  auto gw = start_gateway(backend_args(liar));
  wait_healthy(gw, 1);
  const std::string body = chat_body(false);
  const std::string request = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              "Connection: close\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  auto http11 = raw_exchange(gw.port, request);
  EXPECT_THAT(http11, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(http11, HasSubstr("Transfer-Encoding: chunked"));
  EXPECT_THAT(http11, ::testing::Not(HasSubstr("Content-Length")));
  EXPECT_THAT(http11, HasSubstr("\r\n0\r\n\r\n"));

  std::string request10 = request;
  request10.replace(request10.find("HTTP/1.1"), 8, "HTTP/1.0");
  auto http10 = raw_exchange(gw.port, request10);
  ASSERT_THAT(http10, HasSubstr("HTTP/1.0 200"));
  EXPECT_THAT(http10, ::testing::Not(HasSubstr("Content-Length")));
  auto j = json::parse(http10.substr(http10.find("\r\n\r\n") + 4), nullptr, false);
  EXPECT_TRUE(j.is_object() && j.contains("choices")) << http10;
}

// A malformed chunk before any byte reached the client is an ordinary failed attempt: retried on
// another backend, or answered with a 502 and an error body, never an empty reply.
// A backend that answers a request twice puts its connection one answer behind: the extra
// answer comes after the connection went back to the pool, and would be taken for the next
// request's. When the backend echoes X-Request-ID, the gateway sees the mismatch: the next client
// never gets another's answer (a 502 here, with only that backend to try).
TEST(ProxyTest, AnAnswerCarryingAnotherRequestsIdNeverReachesTheClient) {
  auto liar = start_mocks(1, {"--lie", "answer-twice"});
  auto gw = start_gateway(concat(backend_args(liar), {"--set", "passive.failures=1000"}));
  wait_healthy(gw, 1);
  int out_of_step = 0;
  for (int i = 0; i < 6; ++i) {
    const std::string id = "req-" + std::to_string(i);
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Request-ID", id}});
    if (r.status == 502) {
      EXPECT_THAT(r.body, HasSubstr("out of step"));
      ++out_of_step;
      continue;
    }
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Request-ID"), id);
    EXPECT_THAT(r.body, HasSubstr("\"cmpl-" + id + "\""));
  }
  EXPECT_GE(out_of_step, 1) << "the liar's extra answers were never caught";
  EXPECT_GE(json::parse(http_request(liar[0].port, "GET", "/mock/stats").body)["lies"].get<int>(), 1);
}

// However late the extra answer comes: one carrying the id the gateway gave an earlier request
// is caught after any number of requests in between (here five, more than the ids of the last
// four kept per connection for the clients' own ids).
TEST(ProxyTest, ALateAnswerCarryingAnEarlierGatewayIdIsCaught) {
  auto liar = start_mocks(1, {"--lie", "answer-late"});
  auto gw = start_gateway(concat(backend_args(liar), {"--threads", "1", "--set", "passive.failures=1000"}));
  wait_healthy(gw, 1);
  std::set<std::string> ids;
  int out_of_step = 0;
  for (int i = 0; i < 8; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    if (r.status == 502) {
      EXPECT_THAT(r.body, HasSubstr("out of step"));
      ++out_of_step;
      continue;
    }
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_TRUE(ids.insert(r.header("X-Request-ID")).second) << "an answer given twice: " << r.header("X-Request-ID");
  }
  EXPECT_EQ(out_of_step, 1);
  EXPECT_EQ(json::parse(http_request(liar[0].port, "GET", "/mock/stats").body)["lies"].get<int>(), 1);
}

// A late answer carrying an id sent earlier on the connection (here the clients' own ids, the
// late one coming five requests after its own, past what an id's prefix would tell: `req-10`
// then `req-1`) is out of step, within the last 64 requests of the connection.
TEST(ProxyTest, ALateAnswerCarryingAnEarlierClientIdIsCaught) {
  auto liar = start_mocks(1, {"--lie", "answer-late"});
  auto gw = start_gateway(concat(backend_args(liar), {"--threads", "1", "--set", "passive.failures=1000"}));
  wait_healthy(gw, 1);
  int out_of_step = 0;
  for (const std::string id : {"req-10", "req-2", "req-3", "req-4", "req-5", "req-1", "req-6", "req-7"}) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Request-ID", id}});
    if (r.status == 502) {
      EXPECT_THAT(r.body, HasSubstr("out of step"));
      ++out_of_step;
      continue;
    }
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_THAT(r.body, HasSubstr("\"cmpl-" + id + "\"")) << id << " got another's answer";
  }
  EXPECT_EQ(out_of_step, 1);
}

// A server that echoes some ids and makes up others (asgi-correlation-id keeps only UUIDs) is
// not out of step: an answer is only taken for another request's when it carries an id sent
// before on the connection, and one that was not an exact echo ends the no-id rule for good.
TEST(ProxyTest, AServerThatEchoesOnlySomeIdsIsServed) {
  auto mocks = start_mocks(1, {"--echo-uuid-ids-only"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1"}));
  wait_healthy(gw, 1);
  for (int i = 0; i < 8; ++i) {
    Headers headers;
    if (i % 2 == 0) headers = {{"X-Request-ID", "3f2a9c1d-0000-4000-8000-00000000000" + std::to_string(i)}};
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), headers);
    EXPECT_EQ(r.status, 200) << i << ": " << r.body;
  }
}

// Only an id exactly as the gateway gave it to another request is taken for one: an echo that a
// proxy changed (a suffix, two fields merged) is relayed.
TEST(ProxyTest, OnlyAnotherRequestsWholeIdMakesAnAnswerOutOfStep) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1", "--set", "passive.failures=1000"}));
  wait_healthy(gw, 1);
  auto first = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  ASSERT_EQ(first.status, 200);
  const auto earlier = first.header("X-Request-ID");  // ig-<worker>-<random>-<counter>
  ASSERT_THAT(earlier, StartsWith("ig-0-"));
  auto answer_with_id = [&](const std::string& id) {
    const std::string answer = "HTTP/1.1 200 OK\r\nX-Request-ID: " + id + "\r\nContent-Length: 2\r\n\r\nok";
    return http_request(gw.port, "POST", "/mock/raw", answer);
  };
  EXPECT_EQ(answer_with_id(earlier).status, 502);
  EXPECT_EQ(answer_with_id(earlier + "/0").status, 200);
  EXPECT_EQ(answer_with_id(earlier + ", " + earlier).status, 200);
  EXPECT_EQ(answer_with_id("someone-else").status, 200);
}

// Backends (or routers in front of them) that answer with ids of their own are not out of step.
TEST(ProxyTest, ABackendWithItsOwnRequestIdsIsServedNormally) {
  auto mocks = start_mocks(1, {"--own-request-ids"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  for (int i = 0; i < 4; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_THAT(r.header("X-Request-ID"), StartsWith("mock-own-"));
  }
}

TEST(ProxyTest, AMalformedChunkBeforeAnyByteIsRetriedOrAnswered502) {
  auto liar = start_mocks(1, {"--lie", "bad-chunk"});
  auto good = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(liar), concat(backend_args(good), {"--set", "passive.failures=1000"})));
  wait_healthy(gw, 2);
  for (int i = 0; i < 4; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200) << r.body << r.error;
    EXPECT_EQ(r.header("X-Backend"), good[0].id());
  }
  auto alone = start_gateway(backend_args(liar));
  wait_healthy(alone, 1);
  auto r = http_request(alone.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 502) << r.error;
  auto j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr("malformed chunked body"));
}

// A client that leaves in the middle of a body is nobody's failure but its own: the backend's
// failure count stays at zero and it is never ejected for it.
TEST(ProxyTest, AClientLeavingMidBodyIsNotChargedToTheBackend) {
  auto slow = start_mocks(1, {"--hang-after-header"});
  auto gw = start_gateway(concat(backend_args(slow), {"--set", "passive.failures=2"}));
  wait_healthy(gw, 1);
  auto backend = [&] {
    auto j = json::parse(http_request(gw.port, "GET", "/admin/backends").body);
    return j["backends"][0];
  };
  for (int i = 0; i < 3; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 300ms);
    EXPECT_FALSE(r.error.empty()) << "the head came, the body never does";
    // The gateway notices the client is gone and ends the exchange.
    ASSERT_TRUE(poll_until([&] { return backend()["inflight"] == 0; }, 5s));
  }
  auto b = backend();
  EXPECT_EQ(b["failures"], 0) << b.dump();
  EXPECT_EQ(b["state"], "healthy") << b.dump();
}

// A backend that takes a request on a parked connection and closes it (it crashed on the
// request), at once or later, is not a stale pooled connection: the request is not sent to it
// again behind the client's back, and with retries.after_sent=false it reaches it once.
TEST(ProxyTest, AConnectionClosedAfterTakingTheRequestIsAFailedAttemptNotASilentResend) {
  for (const char* delay_ms : {"0", "100", "400"}) {
    SCOPED_TRACE(std::string("closed ") + delay_ms + " ms after the request");
    auto dying = start_mocks(1, {"--drop-request", "--drop-delay-ms", delay_ms});
    auto gw = start_gateway(concat(backend_args(dying), {"--threads", "1", "--set", "retries.after_sent=false"}));
    wait_healthy(gw, 1);
    // Park a connection: /echo is proxied and answered normally.
    ASSERT_EQ(http_request(gw.port, "POST", "/echo", "{}", {{"Content-Type", "application/json"}}).status, 200);
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    EXPECT_EQ(r.status, 502) << r.body;
    EXPECT_THAT(r.body, HasSubstr("after 1 attempt(s)"));
    EXPECT_EQ(json::parse(http_request(dying[0].port, "GET", "/mock/stats").body)["requests"], 1);
  }
}

// A backend that answers from the request head alone (its body limit, 413) and closes with the
// body unread: the client gets that answer, not a 502 for the reset that cut the upload, and
// the backend is not counted as failing. Small bodies fit in the socket buffers (the upload
// ends before the answer is read); large ones do not (the upload fails first).
TEST(ProxyTest, AnAnswerTheBackendGivesBeforeTakingTheBodyReachesTheClient) {
  auto limited = start_mocks(1, {"--max-body", "1000"});
  auto gw = start_gateway(concat(backend_args(limited), {"--set", "passive.failures=1", "--set", "retries.max=0"}));
  wait_healthy(gw, 1);
  for (const std::size_t size : {std::size_t{4} << 10, std::size_t{16} << 20}) {
    SCOPED_TRACE("body of " + std::to_string(size) + " bytes");
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false, "\"pad\":\"" + std::string(size, 'x') + "\""));
    EXPECT_EQ(r.status, 413) << r.body;
    EXPECT_THAT(r.body, HasSubstr("request body is larger than 1000 bytes"));
    // Not a failure of the backend (passive.failures=1 would have ejected it): served next.
    EXPECT_EQ(http_request(gw.port, "GET", "/v1/models").status, 200);
  }
}

// An early answer to an upload the backend cut short (it never took the body) says nothing the
// backend acted on: even when that answer cannot be relayed (a malformed head), the request is
// tried on another backend with retries.after_sent=false.
TEST(ProxyTest, AnUnusableEarlyAnswerToACutUploadIsRetriedEvenWithoutAfterSent) {
  auto liar = start_mocks(1, {"--max-body", "1000", "--lie", "bad-early-answer"});
  auto good = start_mocks(1);
  auto gw = start_gateway(concat(concat(backend_args(liar), backend_args(good)),
                                 {"--set", "retries.after_sent=false", "--set", "passive.failures=100"}));
  wait_healthy(gw, 2);
  const auto body = chat_body(false, "\"pad\":\"" + std::string(std::size_t{16} << 20, 'x') + "\"");
  for (int i = 0; i < 2; ++i) {  // round robin: one of the two starts on the liar
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", body);
    EXPECT_EQ(r.status, 200) << r.body;
  }
  EXPECT_EQ(json::parse(http_request(liar[0].port, "GET", "/mock/stats").body)["lies"], 1);
}

// timeouts.idle bounds each wait for the backend to take more of a request, not the whole upload:
// a backend reading a 16 MiB prompt steadily at 8 MB/s (longer than idle in all) is served, and
// one that stops reading is cut after idle.
TEST(ProxyTest, AnUploadIsCutOnlyWhenTheBackendStopsTakingIt) {
  const auto body = chat_body(false, "\"pad\":\"" + std::string(std::size_t{16} << 20, 'x') + "\"");
  {
    auto slow = start_mocks(1, {"--read-rate", "8000000"});
    auto gw = start_gateway(concat(backend_args(slow), {"--set", "timeouts.idle=400ms", "--set", "retries.max=0"}));
    wait_healthy(gw, 1);
    const auto started = Clock::now();
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", body, {}, 30s);
    const auto took = Clock::now() - started;
    EXPECT_EQ(r.status, 200) << r.body;
    EXPECT_GT(took, 1s) << "the upload did not outlast timeouts.idle, so this case shows nothing";
    EXPECT_EQ(json::parse(http_request(slow[0].port, "GET", "/mock/stats").body)["requests"], 1);
  }
  {
    auto stuck = start_mocks(1, {"--read-rate", "1"});  // reads 64 KiB, then waits for hours
    auto gw = start_gateway(concat(backend_args(stuck), {"--set", "timeouts.idle=400ms", "--set", "retries.max=0"}));
    wait_healthy(gw, 1);
    const auto started = Clock::now();
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", body, {}, 30s);
    EXPECT_EQ(r.status, 504) << r.body;
    EXPECT_THAT(r.body, HasSubstr("the backend took no more request bytes for timeouts.idle (400ms)"));
    EXPECT_LT(Clock::now() - started, 5s);
  }
}

// limits.max_body_memory bounds the request bodies held at once across connections: while one
// 12 MiB prompt is held (its backend reads it slowly, for 2 s), a second that would pass the limit is
// answered 503 with Retry-After, whether its length is announced (a client waiting for 100
// Continue is refused from the head) or it comes chunked (its memory is free again while the
// refused client is still drained); once the first is done the same request is served.
TEST(ProxyTest, RequestBodiesPastMaxBodyMemoryAreRefusedWithRetryAfterUntilMemoryIsFree) {
  auto slow = start_mocks(1, {"--read-rate", "4000000"});
  auto gw = start_gateway(concat(backend_args(slow), {"--set", "limits.max_body=16MiB", "--set",
                                                      "limits.max_body_memory=20MiB", "--set", "retries.max=0"}));
  wait_healthy(gw, 1);
  EXPECT_EQ(gauge(gw.port, "infergate_request_body_bytes_limit"), 20 << 20);
  const auto first_body = chat_body(false, "\"pad\":\"" + std::string(std::size_t{12} << 20, 'x') + "\"");
  const auto second_body = chat_body(false, "\"pad\":\"" + std::string(std::size_t{10} << 20, 'y') + "\"");
  HttpResult first;
  std::thread uploader([&] { first = http_request(gw.port, "POST", "/v1/chat/completions", first_body, {}, 30s); });
  const bool held = poll_until(
      [&] { return gauge(gw.port, "infergate_request_body_bytes") == static_cast<double>(first_body.size()); }, 10s);
  // Sent while the first is held.
  auto refused = http_request(gw.port, "POST", "/v1/chat/completions", second_body);
  // A client that waits for 100 Continue is refused from the head: it is never asked for the body.
  const auto refused_early = raw_exchange(
      gw.port, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: "
               "100-continue\r\nContent-Length: " + std::to_string(second_body.size()) + "\r\n\r\n", 10s);
  std::string chunked = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n";
  for (std::size_t at = 0; at < second_body.size(); at += 1 << 20) {
    const auto piece = second_body.substr(at, 1 << 20);
    char size[32];
    std::snprintf(size, sizeof size, "%zx\r\n", piece.size());
    chunked += size + piece + "\r\n";
  }
  RawConnection chunked_client(gw.port);
  chunked_client.send(chunked);  // no last chunk: the client is still sending when refused
  chunked_client.read_until(has_whole_response, 10s);
  const auto refused_chunked = chunked_client.received();
  // While the refused client is still drained, the memory its body took is free again.
  chunked_client.send("100000\r\n" + std::string(1 << 20, 'z'));
  const bool given_back = poll_until(
      [&] { return gauge(gw.port, "infergate_request_body_bytes") == static_cast<double>(first_body.size()); }, 1500ms);
  uploader.join();
  ASSERT_TRUE(held) << "the first body never showed as held";
  EXPECT_EQ(first.status, 200) << first.body;
  EXPECT_EQ(refused.status, 503) << refused.body;
  EXPECT_EQ(refused.header("Retry-After"), "1");
  EXPECT_THAT(refused.body, HasSubstr("limits.max_body_memory allows (20MiB)"));
  EXPECT_THAT(refused_early, StartsWith("HTTP/1.1 503"));  // no 100 Continue before it
  EXPECT_THAT(refused_early, HasSubstr("Retry-After: 1"));
  EXPECT_THAT(refused_chunked, StartsWith("HTTP/1.1 503"));
  EXPECT_TRUE(given_back) << gauge(gw.port, "infergate_request_body_bytes");
  EXPECT_THAT(refused_chunked, HasSubstr("limits.max_body_memory allows (20MiB)"));
  EXPECT_THAT(gw.process->errors(), HasSubstr("past limits.max_body_memory (20MiB"));
  // Neither refused request reached the backend.
  EXPECT_EQ(json::parse(http_request(slow[0].port, "GET", "/mock/stats").body)["requests"], 1);
  // The first request's memory is given back: the same request is served now.
  EXPECT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_request_body_bytes") == 0; }, 5s));
  EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", second_body, {}, 30s).status, 200);
  // Given back once the answer is out (the client may read it a moment before).
  EXPECT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_request_body_bytes") == 0; }, 5s));
}

// Body memory is taken as a body arrives, not as its head announces: clients that send a head
// with a large Content-Length and then nothing (or a byte now and then) do not lock everyone
// else's large prompts out.
TEST(ProxyTest, HeadsThatAnnounceLargeBodiesHoldNoMoreMemoryThanTheyHaveSent) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "limits.max_body=16MiB", "--set",
                                                       "limits.max_body_memory=20MiB"}));
  wait_healthy(gw, 1);
  std::vector<int> stalled;
  for (int i = 0; i < 3; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(gw.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const std::string head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             "Content-Length: 16000000\r\n\r\n{\"model\":";
    ASSERT_EQ(::send(fd, head.data(), head.size(), MSG_NOSIGNAL), static_cast<ssize_t>(head.size()));
    stalled.push_back(fd);
  }
  // Each holds what came and the room of its next read (1 MiB), not the 16 MB it announced.
  EXPECT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_request_body_bytes") == 3 * ((1 << 20) + 9); }, 5s))
      << gauge(gw.port, "infergate_request_body_bytes");
  const auto body = chat_body(false, "\"pad\":\"" + std::string(std::size_t{12} << 20, 'x') + "\"");
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", body, {}, 30s);
  EXPECT_EQ(r.status, 200) << r.body;
  for (const int fd : stalled) ::close(fd);
  EXPECT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_request_body_bytes") == 0; }, 5s));
}

// A 408 on a parked connection is the backend closing it for idleness as the request came, not
// an answer: the request goes again on a fresh connection (the client got the 408 before),
// whether the upload finished first (small body) or was cut by the close (large body).
TEST(ProxyTest, A408OnAParkedConnectionIsRetriedOnAFreshOne) {
  auto closing = start_mocks(1, {"--idle-408"});
  auto gw = start_gateway(concat(backend_args(closing), {"--threads", "1", "--set", "retries.max=0"}));
  wait_healthy(gw, 1);
  for (const std::size_t size : {std::size_t{16}, std::size_t{16} << 20}) {
    SCOPED_TRACE("body of " + std::to_string(size) + " bytes");
    // The first completion parks a connection; the next one is sent on it and gets the 408.
    ASSERT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
    auto r = http_request(gw.port, "POST", "/v1/chat/completions",
                          chat_body(false, "\"pad\":\"" + std::string(size, 'x') + "\""), {}, 20s);
    EXPECT_EQ(r.status, 200) << r.body;
  }
}

// Counts whole Content-Length responses arriving back to back, resuming where it stopped.
struct ResponseCounter {
  std::size_t at = 0;
  int whole = 0;
  int count(const std::string& bytes) {
    static const std::regex length("\r\n[Cc]ontent-[Ll]ength: *([0-9]+)");
    for (;;) {
      const auto end = bytes.find("\r\n\r\n", at);
      if (end == std::string::npos) return whole;
      std::smatch m;
      const std::string head = bytes.substr(at, end - at);
      if (!std::regex_search(head, m, length)) return whole;
      const auto next = end + 4 + std::stoul(m[1]);
      if (next > bytes.size()) return whole;
      ++whole;
      at = next;
    }
  }
};

// The gateway's heap allocations so far, as the LD_PRELOAD counting shim reports them on SIGUSR2.
long allocations_so_far(const Gateway& gw, const std::filesystem::path& file) {
  std::filesystem::remove(file);
  ::kill(gw.process->pid(), SIGUSR2);
  std::string text;
  EXPECT_TRUE(poll_until(
      [&] {
        std::ifstream in(file);
        text.assign((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        return !text.empty() && text.back() == '\n';
      },
      5s))
      << "the counting shim did not report";
  return text.empty() ? -1 : std::stol(text);
}

bool gateway_is_sanitized() {
  std::ifstream in(gateway_binary(), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes.find("__asan_init") != std::string::npos || bytes.find("__tsan_init") != std::string::npos;
}

// A request over a warm connection costs the gateway no heap allocation: the request path's
// coroutine frames and handlers are recycled by Asio (which recycles nothing over about 1 KiB,
// so a coroutine frame that grows past it is a malloc/free pair per request, and each such
// allocation also evicts a recycled smaller one), and the connection keeps its buffers. The count
// is read before and after 2,000 requests, so start-up and readiness polls do not enter it.
TEST(ProxyTest, AWarmKeepAliveConnectionProxiesWithoutHeapAllocations) {
  if (gateway_is_sanitized()) GTEST_SKIP() << "the sanitizers own malloc; the count needs the plain build";
#ifndef NDEBUG
  GTEST_SKIP() << "unoptimized builds have larger coroutine frames than Asio recycles";
#endif
  auto backends = start_mocks(2);
  const auto file = std::filesystem::temp_directory_path() / ("infergate-allocations-" + std::to_string(::getpid()));
  auto gw = start_gateway(concat(backend_args(backends), {"--threads", "1", "--set", "health.interval=1h"}),
                          {"LD_PRELOAD=" INFERGATE_ALLOCATION_COUNTER, "IG_TEST_ALLOCATIONS_FILE=" + file.string()});
  wait_healthy(gw, 2);
  RawConnection client(gw.port);
  const auto body = chat_body(false);
  const std::string request = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                              "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  ResponseCounter responses;
  auto exchange = [&](int count) {
    const int target = responses.whole + count;
    for (int i = responses.whole + 1; i <= target; ++i) {
      ASSERT_TRUE(client.send(request));
      ASSERT_TRUE(client.read_until([&](const std::string& got) { return responses.count(got) >= i; }))
          << "request " << i;
    }
  };
  exchange(20);  // warm: both backends' connections pooled, buffers grown, frames cached
  const long before = allocations_so_far(gw, file);
  exchange(2000);
  const long after = allocations_so_far(gw, file);
  std::filesystem::remove(file);
  ASSERT_GT(before, 0);
  EXPECT_LT(static_cast<double>(after - before) / 2000.0, 0.05) << before << " allocations before 2,000 requests, " << after << " after";
}

// Under concurrency many pooled connections go stale at once (a backend that closes each
// connection after a few requests without saying so, or restarted): the replacement must be a
// fresh connection, not another parked one that is just as dead, and none of it may count
// against the backend (it was ejected, and clients got 503s, when the replacement came from the
// pool).
TEST(ProxyTest, StalePooledConnectionsUnderConcurrencyNeverFailARequest) {
  auto mocks = start_mocks(2, {"--close-after", "2"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "2"}));
  wait_healthy(gw, 2);
  std::atomic<int> failed{0};
  std::string first_failure;
  std::mutex failure_mutex;
  std::vector<std::thread> clients;
  const auto body = chat_body(false);
  const std::string request = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                              "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  // Kept-alive clients sending back to back, as a trainer's pool does: a connection parked a
  // moment ago is taken again before the backend's close has arrived.
  for (int t = 0; t < 32; ++t) {
    clients.emplace_back([&] {
      RawConnection client(gw.port);
      ResponseCounter responses;
      for (int i = 1; i <= 50; ++i) {
        client.send(request);
        if (!client.read_until([&](const std::string& got) { return responses.count(got) >= i; })) {
          if (failed.fetch_add(1) == 0) {
            std::lock_guard lock(failure_mutex);
            first_failure = client.received().substr(responses.at, 400);
          }
          return;
        }
      }
      const auto& got = client.received();
      if (got.find("HTTP/1.1 200") == std::string::npos || got.find("HTTP/1.1 5") != std::string::npos) {
        if (failed.fetch_add(1) == 0) {
          std::lock_guard lock(failure_mutex);
          const auto at = got.find("HTTP/1.1 5");
          first_failure = got.substr(at == std::string::npos ? 0 : at, 400);
        }
      }
    });
  }
  for (auto& c : clients) c.join();
  EXPECT_EQ(failed.load(), 0) << first_failure;
  const auto metrics = http_request(gw.port, "GET", "/metrics").body;
  auto value = [&](const std::string& series) {
    const auto at = metrics.find(series + " ");
    return at == std::string::npos ? std::string("missing") : metrics.substr(at + series.size() + 1, metrics.find('\n', at) - at - series.size() - 1);
  };
  for (const auto& m : mocks) {
    const std::string labels = "{backend=\"" + m.id() + "\",node=\"127.0.0.1\",slot=\"0\"";
    EXPECT_EQ(value("infergate_backend_requests_total" + labels + ",code=\"error\"}"), "0");
    EXPECT_EQ(value("infergate_backend_retries_total" + labels + "}"), "0");
    EXPECT_EQ(value("infergate_backend_ejections_total" + labels + "}"), "0");
  }
}

// retries.after_sent=false: a request the backend received and never answered (it may have
// crashed the server) is not sent to another; failures before sending still are.
TEST(ProxyTest, RetriesAfterSentFalseSendsARequestToOneBackendOnly) {
  auto dropping = start_mocks(2, {"--drop-request"});
  auto gw = start_gateway(concat(backend_args(dropping), {"--set", "retries.after_sent=false", "--set",
                                                          "passive.failures=100"}));
  wait_healthy(gw, 2);
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 502);
  EXPECT_THAT(r.body, HasSubstr("after 1 attempt(s)"));
  EXPECT_THAT(r.body, HasSubstr("not retried (retries.after_sent is false)"));
  int received = 0;
  for (const auto& m : dropping) received += json::parse(http_request(m.port, "GET", "/mock/stats").body)["requests"].get<int>();
  EXPECT_EQ(received, 1);

  // A backend that never got the request (connection refused) is still retried elsewhere.
  auto gone = start_mocks(1);
  auto good = start_mocks(1);
  auto gw_refused = start_gateway(concat(concat(backend_args(gone), backend_args(good)),
                                         {"--set", "retries.after_sent=false", "--set", "health.interval=1h"}));
  wait_healthy(gw_refused, 2);
  gone[0].process->kill();
  for (int i = 0; i < 2; ++i) {  // round robin: one of the two starts on the refusing port
    auto served = http_request(gw_refused.port, "POST", "/v1/chat/completions", chat_body(false));
    EXPECT_EQ(served.status, 200) << served.body;
  }

  // The default retries it on the other backend.
  auto gw_default = start_gateway(concat(backend_args(dropping), {"--set", "passive.failures=100"}));
  wait_healthy(gw_default, 2);
  auto retried = http_request(gw_default.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(retried.status, 502);
  EXPECT_THAT(retried.body, HasSubstr("after 2 attempt(s)"));
}

// A backend that read a request on a parked connection and then reset the connection (no end
// of stream first) may have acted on it: with retries.after_sent=false that is an ordinary
// failed attempt, never a silent re-send on a fresh connection, so it gets the request once.
// (With the default, a reset alone is taken for what it most often is, a server closing the
// parked connection for idleness with the request unread, and the request goes again on a
// fresh connection.)
TEST(ProxyTest, ABackendThatResetsAfterReadingARequestGetsItOnce) {
  auto mocks = start_mocks(1, {"--lie", "reset-after-reading"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1", "--set", "retries.after_sent=false", "--set",
                                                       "passive.failures=100"}));
  wait_healthy(gw, 1);
  auto first = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  ASSERT_EQ(first.status, 200) << first.body;  // its connection is parked
  auto second = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(second.status, 502) << second.body;
  EXPECT_THAT(second.body, HasSubstr("not retried (retries.after_sent is false)"));
  EXPECT_EQ(requests_received(mocks), 2);
  EXPECT_EQ(json::parse(http_request(mocks[0].port, "GET", "/mock/stats").body)["lies"], 1);

  auto resetting = start_mocks(1, {"--lie", "reset-after-reading"});
  auto gw_default = start_gateway(concat(backend_args(resetting), {"--threads", "1", "--set", "passive.failures=100"}));
  wait_healthy(gw_default, 1);
  for (int i = 0; i < 2; ++i) {
    auto r = http_request(gw_default.port, "POST", "/v1/chat/completions", chat_body(false));
    EXPECT_EQ(r.status, 200) << r.body;
  }
  EXPECT_EQ(requests_received(resetting), 3);  // the second went again, on a fresh connection
  EXPECT_EQ(metric(gw_default.port, "infergate_backend_requests_total",
                   "backend=\"" + resetting[0].id() + "\",node=\"127.0.0.1\",slot=\"0\",code=\"error\""),
            0);
  // Counted: the backend may have generated the first copy for nobody.
  EXPECT_EQ(metric(gw_default.port, "infergate_backend_resends_total",
                   "backend=\"" + resetting[0].id() + "\",node=\"127.0.0.1\",slot=\"0\""),
            1);
}

// An answer that cannot be relayed (a malformed head, a protocol switch, one out of step) came
// from a backend that had the whole request and may have acted on it: with
// retries.after_sent=false it is not sent to another.
TEST(ProxyTest, RetriesAfterSentFalseDoesNotResendAfterAnUnusableAnswer) {
  auto mocks = start_mocks(2);
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "retries.after_sent=false", "--set",
                                                       "passive.failures=100"}));
  wait_healthy(gw, 2);
  auto raw_requests = [&] {
    int n = 0;
    for (const auto& m : mocks) n += json::parse(http_request(m.port, "GET", "/mock/stats").body)["raw_requests"].get<int>();
    return n;
  };
  int sent = 0;
  for (const std::string answer : {"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
                                   "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"}) {
    auto r = http_request(gw.port, "POST", "/mock/raw", answer, {{"Content-Type", "text/plain"}});
    EXPECT_EQ(r.status, 502) << r.body;
    EXPECT_THAT(r.body, HasSubstr("after 1 attempt(s)"));
    EXPECT_THAT(r.body, HasSubstr("not retried (retries.after_sent is false)"));
    EXPECT_EQ(raw_requests(), ++sent) << answer;
  }
}

// A 408 on a parked connection is taken for the backend's idle close (and the request sent again
// on a new connection) only when it closes the connection at once; a 408 that keeps it open is
// the backend's answer to this request: relayed, and the request sent once.
TEST(ProxyTest, A408ThatKeepsTheConnectionIsRelayedNotResent) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1"}));
  wait_healthy(gw, 1);
  ASSERT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);  // parks one
  auto r = http_request(gw.port, "POST", "/mock/raw", "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n",
                        {{"Content-Type", "text/plain"}});
  EXPECT_EQ(r.status, 408) << r.body;
  EXPECT_EQ(json::parse(http_request(mocks[0].port, "GET", "/mock/stats").body)["raw_requests"], 1);
}

// A retry is picked from the backends as they are when it goes out, not as they were when the
// request came in: one undrained meanwhile takes it (and one drained meanwhile would not).
TEST(ProxyTest, ARetryIsPickedFromTheBackendsAsTheyAreNow) {
  auto dying = start_mocks(1, {"--drop-request", "--drop-delay-ms", "600"});
  auto others = start_mocks(2);
  auto gw = start_gateway(concat(concat(backend_args(dying), backend_args(others)), {"--set", "passive.failures=100"}));
  wait_healthy(gw, 3);
  for (const auto& m : others) {
    ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + m.id() + "/drain").status, 200);
  }
  HttpResult r;
  std::thread client([&] { r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)); });
  // The request is on the dying backend (the only one routable) by the time it has the request.
  ASSERT_TRUE(poll_until([&] { return json::parse(http_request(dying[0].port, "GET", "/mock/stats").body)["requests"] == 1; }, 5s));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + others[1].id() + "/undrain").status, 200);
  client.join();
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.header("X-Backend"), others[1].id());
}

// timeouts.total ends an exchange that keeps going (a stream, or a body that never ends) without
// counting it against the backend: a long generation is the limit's business, not a fault.
TEST(ProxyTest, TotalTimeoutCutsLongResponsesWithoutBlamingTheBackend) {
  auto streaming = start_mocks(1, {"--tokens", "1000", "--token-delay-ms", "50"});
  auto stalled = start_mocks(1, {"--hang-after-header"});
  auto gw = start_gateway(concat(backend_args(streaming), concat(backend_args(stalled),
                                 {"--set", "timeouts.total=600ms", "--set", "passive.failures=1"})));
  wait_healthy(gw, 2);
  auto backends = [&] { return json::parse(http_request(gw.port, "GET", "/admin/backends").body)["backends"]; };
  for (int i = 0; i < 2; ++i) {  // round robin: one request to each
    const auto t0 = Clock::now();
    auto r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 10s);
    const auto took = Clock::now() - t0;
    if (r.headers["x-backend"] == streaming[0].id()) {  // cut in the middle
      EXPECT_EQ(r.status, 200);
      EXPECT_FALSE(r.complete);
    } else {  // nothing of it had come: 504, not retried past the limit
      EXPECT_EQ(r.status, 504) << r.body();
      EXPECT_THAT(r.body(), HasSubstr("timeouts.total"));
    }
    EXPECT_GE(took, 550ms);
    EXPECT_LT(took, 3s);
  }
  ASSERT_TRUE(poll_until([&] { return backends()[0]["inflight"] == 0 && backends()[1]["inflight"] == 0; }, 5s));
  for (const auto& b : backends()) {
    EXPECT_EQ(b["failures"], 0) << b.dump();
    EXPECT_EQ(b["state"], "healthy") << b.dump();
  }
}

// With backends that never answer, timeouts.total bounds the retries: 504 naming the limit, long
// before (retries.max + 1) x timeouts.first_byte.
TEST(ProxyTest, TotalTimeoutBoundsRetriesOnHangingBackends) {
  auto hanging = start_mocks(2, {"--drop-request", "--drop-delay-ms", "60000"});  // /health still answers
  auto gw = start_gateway(concat(backend_args(hanging), {"--set", "timeouts.first_byte=10s", "--set", "retries.max=3",
                                                         "--set", "timeouts.total=700ms"}));
  wait_healthy(gw, 2);
  const auto t0 = Clock::now();
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 15s);
  EXPECT_LT(Clock::now() - t0, 3s);
  EXPECT_EQ(r.status, 504) << r.body << r.error;
  auto j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr("timeouts.total"));
}

// The backoff before a retry ends when timeouts.total does: the 504 came a whole backoff late
// (here at least 2.5 s for a 300 ms limit), and the retry that never went out was counted in
// infergate_backend_retries_total.
TEST(ProxyTest, TotalTimeoutCutsTheRetryBackoffShortAndCountsNoRetry) {
  auto failing = start_mocks(2, {"--fail-rate", "1", "--fail-status", "503"});
  auto gw = start_gateway(concat(backend_args(failing), {"--set", "timeouts.total=300ms", "--set", "retries.backoff_base=5s",
                                                         "--set", "retries.backoff_max=5s", "--set", "passive.failures=100"}));
  wait_healthy(gw, 2);
  const auto t0 = Clock::now();
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 15s);
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_EQ(r.status, 504) << r.body << r.error;
  EXPECT_THAT(r.body, HasSubstr("after 1 attempt(s)"));
  EXPECT_THAT(r.body, HasSubstr("then timeouts.total (300ms) ran out"));
  const auto metrics = http_request(gw.port, "GET", "/metrics").body;
  for (const auto& m : failing) {
    const std::string series = "infergate_backend_retries_total{backend=\"" + m.id() + "\",node=\"127.0.0.1\",slot=\"0\"} ";
    const auto at = metrics.find(series);
    ASSERT_NE(at, std::string::npos) << series;
    EXPECT_EQ(metrics.substr(at + series.size(), metrics.find('\n', at) - at - series.size()), "0") << series;
  }
}

namespace {
// Sends `request` on a new connection and reads until the server ends it; returns how: "eof"
// (an orderly close), "reset", or "timeout"; `received` gets the bytes. `before_reading` runs
// once the request is sent, and `receive_buffer` (bytes, 0: the default) makes a slow reader.
std::string how_connection_ends(int port, const std::string& request, std::string& received,
                                const std::function<void()>& before_reading = {}, int receive_buffer = 0) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (receive_buffer > 0) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return "connect or send failed";
  }
  if (before_reading) before_reading();
  std::string how = "timeout";
  for (const auto until = Clock::now() + 10s; Clock::now() < until;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 200) != 1) continue;
    char buf[4096];
    const auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      received.append(buf, static_cast<std::size_t>(n));
      continue;
    }
    how = n == 0 ? "eof" : errno == ECONNRESET ? "reset" : std::string("error ") + std::strerror(errno);
    break;
  }
  ::close(fd);
  return how;
}
}  // namespace

// A stream the backend cuts short reaches an HTTP/1.0 client, whose body only the close ends,
// as a reset: an orderly close looked like a complete response. An HTTP/1.1 client still gets
// an orderly close (the missing last chunk says it).
TEST(ProxyTest, AStreamCutShortResetsAnHttp10ClientsConnection) {
  auto mocks = start_mocks(1, {"--drop-mid-stream", "--tokens", "6"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  const auto body = chat_body(true);
  for (const std::string version : {"1.0", "1.1"}) {
    SCOPED_TRACE("HTTP/" + version);
    std::string received;
    const auto how = how_connection_ends(gw.port, "POST /v1/chat/completions HTTP/" + version + "\r\nHost: x\r\n"
                                         "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                                         "\r\n\r\n" + body, received);
    EXPECT_THAT(received, StartsWith("HTTP/1." + version.substr(2) + " 200"));
    EXPECT_THAT(received, HasSubstr("data: "));
    EXPECT_THAT(received, Not(HasSubstr("[DONE]")));
    EXPECT_EQ(how, version == "1.0" ? "reset" : "eof") << received;
  }
}

// So does one the client is too slow to take within timeouts.idle: it is cut, not complete.
TEST(ProxyTest, AStreamTooSlowlyReadResetsAnHttp10ClientsConnection) {
  auto mocks = start_mocks(1, {"--tokens", "200000"});  // far more than the sockets' buffers hold
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "timeouts.idle=300ms"}));
  wait_healthy(gw, 1);
  const auto body = chat_body(true);
  std::string received;
  const auto how = how_connection_ends(
      gw.port,
      "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
          std::to_string(body.size()) + "\r\n\r\n" + body,
      received,
      [&] {  // nothing is read until the gateway has given up writing (the exchange is counted)
        EXPECT_TRUE(poll_until([&] { return metric(gw.port, "infergate_requests_total", "code=\"2xx\"") == 1; }, 10s));
      },
      4096);
  EXPECT_THAT(received, StartsWith("HTTP/1.0 200"));
  EXPECT_THAT(received, Not(HasSubstr("[DONE]")));
  EXPECT_EQ(how, "reset");
  // The access log tells a client too slow to read from one that left.
  EXPECT_TRUE(poll_until([&] { return gw.process->errors().find(" client-stalled") != std::string::npos; }, 5s))
      << gw.process->errors();
}

// A response the client takes too slowly for timeouts.total (but not for timeouts.idle) is cut by
// the gateway's own limit: logged as such, not as a stalled client, and not against the backend.
// Both ways a response is relayed: a streamed one and a large JSON answer.
TEST(ProxyTest, AResponseCutByTimeoutsTotalWhileTheClientReadsIsNotBlamedOnTheClient) {
  // 1,000,000 tokens: a 9.4 MB JSON answer, more than the sockets' buffers hold (4 MiB at most).
  auto mocks = start_mocks(1, {"--tokens", "1000000"});
  auto gw = start_gateway(
      concat(backend_args(mocks), {"--set", "timeouts.idle=30s", "--set", "timeouts.total=1500ms"}));
  wait_healthy(gw, 1);
  auto cuts = [&] {
    const auto log = gw.process->errors();
    int n = 0;
    for (auto at = log.find("outlasted timeouts.total"); at != std::string::npos;
         at = log.find("outlasted timeouts.total", at + 1)) {
      ++n;
    }
    return n;
  };
  for (const bool stream : {true, false}) {
    const auto body = chat_body(stream);
    std::string received;
    const auto started = Clock::now();
    const auto how = how_connection_ends(
        gw.port,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
            std::to_string(body.size()) + "\r\n\r\n" + body,
        received,
        [&] {  // nothing is read until the gateway has given up writing
          EXPECT_TRUE(poll_until([&] { return cuts() == (stream ? 1 : 2); }, 10s))
              << "stream " << stream << ": " << gw.process->errors();
        },
        4096);
    EXPECT_LT(Clock::now() - started, 8s) << "stream " << stream;  // well before timeouts.idle
    EXPECT_THAT(received, StartsWith("HTTP/1.1 200")) << "stream " << stream;
    EXPECT_NE(how, "timeout") << "stream " << stream;
  }
  EXPECT_THAT(gw.process->errors(), HasSubstr("cut on backend"));
  EXPECT_THAT(gw.process->errors(), Not(HasSubstr(" client-stalled")));
  EXPECT_EQ(metric(gw.port, "infergate_backend_requests_total",
                   "backend=\"" + mocks[0].id() + "\",node=\"127.0.0.1\",slot=\"0\",code=\"error\""),
            0);
}

// Forwarded requests carry the gateway's Via entry, and one that comes back to it (the gateway
// added as its own backend) is answered 508 at once instead of going round until every
// connection slot is taken.
TEST(ProxyTest, ARequestThatComesBackToTheGatewayIsALoop) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  auto echoed = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Mock-Echo-Headers", "1"},
                                                                                         {"Via", "1.1 upstream-proxy"}});
  ASSERT_EQ(echoed.status, 200) << echoed.body;
  const auto via = json::parse(echoed.body)["received_headers"]["Via"].get<std::string>();
  EXPECT_THAT(via, HasSubstr("1.1 upstream-proxy"));
  EXPECT_THAT(via, ::testing::MatchesRegex(".*1\\.1 infergate-[0-9a-f]{8}"));

  auto looped = start_gateway({"--no-slurm", "--set", "health.healthy_threshold=1", "--set", "health.interval=200ms"});
  const std::string self = "http://127.0.0.1:" + std::to_string(looped.port);
  ASSERT_EQ(http_request(looped.port, "POST", "/admin/backends", "{\"url\":\"" + self + "\"}").status, 201);
  wait_healthy(looped, 1);  // its own /health answers the probe
  const auto t0 = Clock::now();
  auto r = http_request(looped.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 508) << r.body;
  EXPECT_THAT(r.body, HasSubstr("request loop"));
  EXPECT_LT(Clock::now() - t0, 5s);
}

TEST(ProxyTest, HeadersForwardedAsAProxyShould) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  auto r = http_request(gw.port, "POST", "/v1/chat/completions?x=1", chat_body(false),
                        {{"X-Mock-Echo-Headers", "1"}, {"X-Forwarded-For", "10.0.0.1"}, {"Authorization", "Bearer k"},
                         {"Connection", "keep-alive, X-Hop"}, {"X-Hop", "secret"}, {"Keep-Alive", "timeout=5"}});
  ASSERT_EQ(r.status, 200);
  auto received = json::parse(r.body)["received_headers"];
  EXPECT_EQ(received["X-Forwarded-For"], "10.0.0.1, 127.0.0.1");
  EXPECT_EQ(received["Authorization"], "Bearer k");
  // Two X-Forwarded-For fields are one list: neither part of the chain is lost.
  auto two = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false),
                          {{"X-Mock-Echo-Headers", "1"}, {"X-Forwarded-For", "10.0.0.1"}, {"X-Forwarded-For", "10.0.0.2"}});
  ASSERT_EQ(two.status, 200);
  EXPECT_EQ(json::parse(two.body)["received_headers"]["X-Forwarded-For"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
  // Methods are case-sensitive: `head` is not HEAD, and its answer keeps its body (framing the
  // next answer on the connection right).
  RawConnection lower(gw.port);
  ASSERT_TRUE(lower.send("head /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"));
  ASSERT_TRUE(lower.read_until(has_whole_response, 3s)) << lower.received();
  EXPECT_THAT(lower.received(), HasSubstr("\r\n\r\n{"));
  EXPECT_FALSE(received.contains("X-Hop"));
  EXPECT_FALSE(received.contains("Keep-Alive"));
  ASSERT_TRUE(received.contains("X-Request-ID"));
  EXPECT_EQ(r.header("X-Request-ID"), received["X-Request-ID"]);  // generated and returned
  EXPECT_FALSE(r.header("X-Request-ID").empty());

  auto pipelined = raw_exchange(gw.port,
                                "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                                "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  std::size_t answers = 0;
  for (std::size_t pos = 0; (pos = pipelined.find("HTTP/1.1 200", pos)) != std::string::npos; ++pos) ++answers;
  EXPECT_EQ(answers, 2u);
}

TEST(ProxyTest, SigtermLetsInFlightRequestsFinishAndExitsZero) {
  auto mocks = start_mocks(1, {"--tokens", "10", "--token-delay-ms", "100"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  StreamResult r;
  std::thread client([&] { r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 10s); });
  ASSERT_TRUE(poll_until(
      [&] { return json::parse(http_request(mocks[0].port, "GET", "/mock/stats").body)["requests"] == 1; }, 5s));
  EXPECT_EQ(gw.process->signal_and_wait(SIGTERM, 10s), 0);
  client.join();
  EXPECT_TRUE(r.complete) << r.error;
  EXPECT_THAT(r.body(), HasSubstr("[DONE]"));
}

// A graceful shutdown tells idle keep-alive clients at once (the gateway closes their
// connections when the signal comes, not when it exits), and an answer still in flight says
// `Connection: close`, so its client does not send another request into a closing gateway.
TEST(ProxyTest, SigtermClosesIdleKeepAliveConnectionsAtOnceAndInFlightAnswersSayClose) {
  auto mocks = start_mocks(1, {"--tokens", "20", "--token-delay-ms", "100"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  RawConnection idle(gw.port);
  ASSERT_TRUE(idle.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  ASSERT_TRUE(idle.read_until(has_whole_response)) << idle.received();
  ASSERT_THAT(idle.received(), Not(HasSubstr("Connection: close")));

  RawConnection busy(gw.port);  // a non-streamed answer that takes 2 s to generate
  const auto body = chat_body(false);
  ASSERT_TRUE(busy.send(raw_chat_request(body)));
  ASSERT_TRUE(poll_until(
      [&] { return json::parse(http_request(mocks[0].port, "GET", "/mock/stats").body)["requests"] == 1; }, 5s));

  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  EXPECT_TRUE(idle.wait_closed(1500ms)) << "the idle keep-alive connection stayed open";
  EXPECT_TRUE(gw.process->running()) << "closed only when the gateway exited, not when the drain began";

  ASSERT_TRUE(busy.read_until(has_whole_response, 10s)) << busy.received();
  EXPECT_THAT(busy.received(), StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(busy.received(), HasSubstr("\r\nConnection: close\r\n"));
  EXPECT_TRUE(busy.wait_closed(5s));
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
}

namespace {
enum class PortSide { kLocal, kRemote };

// Whether an established TCP connection on local (or remote) port `port` has bytes its owner
// has not read (the receive queue in /proc/net/tcp and tcp6).
bool unread_bytes_at(int port, PortSide side = PortSide::kLocal) {
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues;
      fields >> slot >> local >> remote >> state >> queues;
      const auto& address = side == PortSide::kLocal ? local : remote;
      const auto colon = address.rfind(':');
      if (colon == std::string::npos || state != "01") continue;
      if (std::stoi(address.substr(colon + 1), nullptr, 16) != port) continue;
      if (std::stoul(queues.substr(queues.find(':') + 1), nullptr, 16) != 0) return true;
    }
  }
  return false;
}
}  // namespace

// A client that half-closes while its answer is on the way, the end of stream and the answer
// coming together: it gets the answer and then the close, not a connection held open until
// timeouts.client_idle (its end of stream, seen by the watch, woke no later read).
TEST(ProxyTest, AClientThatHalfClosedGetsItsAnswerAndTheClose) {
  auto mocks = start_mocks(1, {"--tokens", "25", "--token-delay-ms", "100"});  // the answer after 2.4 s
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1", "--log-level", "trace"}));
  wait_healthy(gw, 1);
  RawConnection client(gw.port);
  ASSERT_TRUE(client.send(raw_chat_request(chat_body(false))));
  ASSERT_TRUE(poll_until([&] { return gw.process->errors().find("watching the client") != std::string::npos; }, 5s));
  // Stopped, the gateway sees the answer and the end of stream in one wake-up.
  ASSERT_EQ(::kill(gw.process->pid(), SIGSTOP), 0);
  const bool answered = poll_until([&] { return unread_bytes_at(mocks[0].port, PortSide::kRemote); }, 10s);
  client.shutdown_write();
  ASSERT_EQ(::kill(gw.process->pid(), SIGCONT), 0);
  ASSERT_TRUE(answered);
  ASSERT_TRUE(client.read_until(has_whole_response, 5s)) << client.received();
  EXPECT_THAT(client.received(), StartsWith("HTTP/1.1 200 "));
  EXPECT_TRUE(client.wait_closed(3s)) << "the connection stayed open after the answer";
}

// A request still arriving when SIGTERM comes (a large prompt uploading: its head and part of
// its body read) is read whole and answered, with `Connection: close`, before the gateway
// exits: it used to exit at once, since only requests read whole counted as in flight.
TEST(ProxyTest, SigtermLetsARequestStillArrivingBeReadAndAnswered) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1"}));
  wait_healthy(gw, 1);
  const auto body = chat_body(false);
  RawConnection uploading(gw.port);
  ASSERT_TRUE(uploading.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body.substr(0, 10)));
  // The signal comes once the gateway has read what was sent.
  ASSERT_TRUE(poll_until([&] { return !unread_bytes_at(gw.port); }, 5s));
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  ASSERT_TRUE(poll_until([&] { return gw.process->errors().find("no longer accepting") != std::string::npos; }, 5s));
  EXPECT_THAT(gw.process->errors(), HasSubstr("and 1 still arriving"));
  ASSERT_TRUE(uploading.send(body.substr(10))) << "the gateway closed the connection";
  ASSERT_TRUE(uploading.read_until(has_whole_response, 10s)) << uploading.received();
  EXPECT_THAT(uploading.received(), StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(uploading.received(), HasSubstr("\r\nConnection: close\r\n"));
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
}

// A request still waiting for its backend when timeouts.shutdown runs out gets an answer (503,
// naming the key, on a closing connection), not a connection closed under it; the gateway
// still exits promptly, with 0.
TEST(ProxyTest, ARequestStillWaitingAtTheShutdownDeadlineGetsA503) {
  auto mocks = start_mocks(1, {"--tokens", "100", "--token-delay-ms", "100"});  // 10 s per answer
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "timeouts.shutdown=500ms"}));
  wait_healthy(gw, 1);
  RawConnection client(gw.port);
  const auto body = chat_body(false);
  ASSERT_TRUE(client.send(raw_chat_request(body)));
  ASSERT_TRUE(poll_until([&] { return inflight_on(gw.port, mocks[0]) == 1; }, 5s));
  // And one still arriving: its body stops halfway.
  RawConnection uploader(gw.port);
  ASSERT_TRUE(uploader.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body.substr(0, 10)));
  ASSERT_TRUE(poll_until([&] { return !unread_bytes_at(gw.port); }, 5s));  // the gateway has read what came
  const auto signalled = Clock::now();
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  ASSERT_TRUE(client.read_until(has_whole_response, 5s)) << client.received();
  const auto& answer = client.received();
  EXPECT_THAT(answer, StartsWith("HTTP/1.1 503 "));
  EXPECT_THAT(answer, HasSubstr("Connection: close\r\n"));
  EXPECT_THAT(answer, HasSubstr("the gateway is shutting down: timeouts.shutdown (500ms) ran out before the backend answered"));
  ASSERT_TRUE(uploader.read_until(has_whole_response, 5s)) << uploader.received();
  EXPECT_THAT(uploader.received(), StartsWith("HTTP/1.1 503 "));
  EXPECT_THAT(uploader.received(), HasSubstr("ran out before the request arrived whole"));
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
  EXPECT_LT(Clock::now() - signalled, 3s);
}

// The same for a request in a retry backoff at the deadline (its pause is ended, not waited out
// past the grace), and a retry is never sent after it.
TEST(ProxyTest, ARequestInARetryBackoffAtTheShutdownDeadlineGetsA503) {
  auto mocks = start_mocks(2, {"--fail-rate", "1", "--fail-status", "502"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "retries.backoff_base=4s", "--set",
                                                       "retries.backoff_max=4s", "--set", "timeouts.shutdown=300ms",
                                                       "--set", "passive.failures=100"}));
  wait_healthy(gw, 2);
  auto received = [&] { return requests_received(mocks); };
  RawConnection client(gw.port);
  ASSERT_TRUE(client.send(raw_chat_request(chat_body(false))));
  ASSERT_TRUE(poll_until([&] { return received() == 1; }, 5s));  // the first attempt's 502; a 2-4 s backoff runs
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  ASSERT_TRUE(client.read_until(has_whole_response, 5s)) << client.received();
  EXPECT_THAT(client.received(), StartsWith("HTTP/1.1 503 "));
  EXPECT_THAT(client.received(), HasSubstr("the gateway is shutting down"));
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
  EXPECT_EQ(received(), 1);
}

// And for a request whose backend's name lookup hangs at the deadline: the lookup is not waited
// out (timeouts.connect, 10 s here) past the grace.
TEST(ProxyTest, ARequestInANameLookupAtTheShutdownDeadlineGetsA503) {
  auto unresolvable = start_mock();
  auto gw = start_gateway_behind_hanging_dns(unresolvable, {"timeouts.connect=10s", "timeouts.shutdown=300ms"});
  wait_healthy(gw, 1);
  RawConnection client(gw.port);
  ASSERT_TRUE(client.send(raw_chat_request(chat_body(false))));
  ASSERT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_inflight_requests") == 1; }, 5s));
  const auto signalled = Clock::now();
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  ASSERT_TRUE(client.read_until(has_whole_response, 5s)) << client.received();
  EXPECT_THAT(client.received(), StartsWith("HTTP/1.1 503 "));
  EXPECT_THAT(client.received(), HasSubstr("the gateway is shutting down"));
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
  EXPECT_LT(Clock::now() - signalled, 3s);
  EXPECT_EQ(gw.process->errors().find("did not finish within timeouts.connect"), std::string::npos) << gw.process->errors();
}

// A second signal exits at once, without waiting for the requests in flight, and says how many
// it cut (they get no access-log line of their own).
TEST(ProxyTest, ASecondSignalExitsAtOnceAndCountsTheRequestsItCuts) {
  auto mocks = start_mocks(1, {"--tokens", "100", "--token-delay-ms", "100"});  // 10 s per answer
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  RawConnection client(gw.port);
  ASSERT_TRUE(client.send(raw_chat_request(chat_body(false))));
  ASSERT_TRUE(poll_until([&] { return inflight_on(gw.port, mocks[0]) == 1; }, 5s));
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  ASSERT_TRUE(poll_until([&] { return gw.process->errors().find("no longer accepting") != std::string::npos; }, 5s));
  const auto second = Clock::now();
  ASSERT_EQ(::kill(gw.process->pid(), SIGINT), 0);
  EXPECT_EQ(gw.process->wait_exit(10s), 0) << gw.process->errors();
  EXPECT_LT(Clock::now() - second, 3s);
  EXPECT_THAT(gw.process->errors(), HasSubstr("second signal (2): exiting now, cutting 1 request(s) in flight"));
}

// At a job's time limit Slurm sends SIGTERM twice within milliseconds: one request to stop, so
// the drain goes on and the request in flight is answered. A SIGTERM a second or more after the
// first still exits at once.
TEST(ProxyTest, TwoSigtermsTogetherAsSlurmSendsThemStillDrain) {
  auto mocks = start_mocks(1, {"--tokens", "10", "--token-delay-ms", "100"});  // 0.9 s per answer
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  HttpResult answer;
  std::jthread client([&] { answer = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 10s); });
  ASSERT_TRUE(poll_until([&] { return inflight_on(gw.port, mocks[0]) == 1; }, 5s));
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  // Taken in before the next comes (the kernel would merge two pending SIGTERMs into one).
  ASSERT_TRUE(poll_until([&] { return gw.process->errors().find("no longer accepting") != std::string::npos; }, 5s, 1ms));
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
  client.join();
  EXPECT_EQ(answer.status, 200) << answer.error << answer.body;
  EXPECT_THAT(gw.process->errors(), HasSubstr("SIGTERM again within 1000ms of the first"));
  EXPECT_THAT(gw.process->errors(), Not(HasSubstr("second signal")));

  auto slow = start_mocks(1, {"--tokens", "50", "--token-delay-ms", "100"});  // 4.9 s per answer
  auto later = start_gateway(backend_args(slow));
  wait_healthy(later, 1);
  HttpResult cut;
  std::jthread cut_client([&] { cut = http_request(later.port, "POST", "/v1/chat/completions", chat_body(false), {}, 10s); });
  ASSERT_TRUE(poll_until([&] { return inflight_on(later.port, slow[0]) == 1; }, 5s));
  ASSERT_EQ(::kill(later.process->pid(), SIGTERM), 0);
  ASSERT_TRUE(poll_until([&] { return later.process->errors().find("no longer accepting") != std::string::npos; }, 5s));
  std::this_thread::sleep_for(1100ms);  // the point of the test is the time between the two signals
  ASSERT_EQ(::kill(later.process->pid(), SIGTERM), 0);
  EXPECT_EQ(later.process->wait_exit(10s), 0);
  EXPECT_THAT(later.process->errors(), HasSubstr("second signal (15): exiting now"));
}

// A stop signal never kills the gateway by its default action, which ends the process with 143
// (Slurm reports a failed step): not while it exits, when signals keep coming (Slurm's second
// SIGTERM, an impatient operator) after it stopped listening for them, and not as soon as it
// says it is listening, before it started to.
TEST(ProxyTest, StopSignalsAtStartAndExitNeverKillTheGateway) {
  auto mocks = start_mocks(1);
  for (int run = 0; run < 3; ++run) {
    // A backend by name: the name lookups run on threads of their own, which must not take a
    // stop signal by its default action either. No thread takes one: every thread has them
    // blocked, and the gateway reads them from a signalfd.
    auto gw = start_gateway({"--backend", "http://localhost:" + std::to_string(mocks[0].port)});
    wait_healthy(gw, 1);
    ASSERT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
    int threads = 0;
    int taking_sigterm = 0;
    for (const auto& task : std::filesystem::directory_iterator("/proc/" + std::to_string(gw.process->pid()) + "/task")) {
      std::ifstream status(task.path() / "status");
      for (std::string line; std::getline(status, line);) {
        if (!line.starts_with("SigBlk:")) continue;
        ++threads;
        if ((std::stoull(line.substr(7), nullptr, 16) & (1ULL << (SIGTERM - 1))) == 0) ++taking_sigterm;
      }
    }
    EXPECT_GE(threads, 4);  // the main thread, two workers, the health checker, lookups
    EXPECT_EQ(taking_sigterm, 0);
    int sent = 0;
    const auto deadline = Clock::now() + 10s;
    while (gw.process->running() && Clock::now() < deadline) {
      if (::kill(gw.process->pid(), SIGTERM) == 0) ++sent;
      std::this_thread::sleep_for(100us);  // pacing the signals, not waiting for anything
    }
    EXPECT_GT(sent, 1);
    EXPECT_EQ(gw.process->wait_exit(10s), 0) << gw.process->errors();
  }
  // The same at the other end: a SIGTERM as soon as the listening line is out (a script that
  // starts the gateway and stops it at once) stops it gracefully too.
  for (int run = 0; run < 10; ++run) {
    auto gw = start_gateway(backend_args(mocks));
    ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
    EXPECT_EQ(gw.process->wait_exit(10s), 0) << gw.process->errors();
  }
}

// A refused client that goes on sending is drained so that it reads the answer, but that is no
// request in flight: SIGTERM ends the draining and the gateway exits at once.
TEST(ProxyTest, SigtermDoesNotWaitForARefusedClientStillSending) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1", "--set", "limits.max_body=1KiB"}));
  wait_healthy(gw, 1);
  RawConnection refused(gw.port);
  ASSERT_TRUE(refused.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" +
                           std::string(64 * 1024, 'x')));
  ASSERT_TRUE(refused.read_until(has_whole_response, 5s)) << refused.received();
  EXPECT_THAT(refused.received(), StartsWith("HTTP/1.1 413"));
  std::atomic<bool> stop{false};
  std::thread sender([&] {  // a byte every 100 ms: the drain's quiet limit (2 s) never comes
    while (!stop && refused.send("x")) std::this_thread::sleep_for(100ms);
  });
  const auto signalled = Clock::now();
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  const int code = gw.process->wait_exit(10s);
  const auto took = Clock::now() - signalled;
  stop = true;
  sender.join();
  EXPECT_EQ(code, 0);
  // Not timeouts.shutdown (25 s), nor the drain's 30 s. (Whether the signal's log line still
  // counts the refused request as arriving is a race with the answer's write: not checked.)
  EXPECT_LT(took, 5s);
}

namespace {
// A memory figure of a process from /proc/PID/status ("VmHWM:", "VmData:"), in KiB.
long status_kib(int pid, std::string_view field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with(field)) return std::stol(line.substr(field.size()));
  }
  return -1;
}
// The process's peak resident memory so far.
long peak_resident_kib(int pid) { return status_kib(pid, "VmHWM:"); }
// The process's data segment (heap and anonymous mappings, touched or not).
long data_segment_kib(int pid) { return status_kib(pid, "VmData:"); }
}  // namespace

// The memory for a body grows with what arrives, not with what the head announces: heads that
// each declare 60 MiB and send 1 KiB made the gateway take 60 MiB apiece (under an address-space
// limit, the requests after the first few were dropped without an answer).
TEST(ProxyTest, AnAnnouncedBodySizeIsNotTakenBeforeTheBodyComes) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1"}));
  wait_healthy(gw, 1);
  const long before = data_segment_kib(gw.process->pid());
  ASSERT_GT(before, 0);
  constexpr long kAnnounced = 60L << 20;
  std::vector<std::unique_ptr<RawConnection>> uploads;
  for (int i = 0; i < 8; ++i) {
    uploads.push_back(std::make_unique<RawConnection>(gw.port));
    ASSERT_TRUE(uploads.back()->send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: " +
                                     std::to_string(kAnnounced) + "\r\n\r\n" + std::string(1024, 'a')));
  }
  // One worker takes the uploads' bytes before the request after them.
  ASSERT_EQ(http_request(gw.port, "GET", "/health").status, 200);
  const long grown_kib = data_segment_kib(gw.process->pid()) - before;
  EXPECT_LT(grown_kib, 8 * (kAnnounced >> 10) / 4) << "the gateway took " << grown_kib << " KiB for 8 KiB of bodies";
  // The uploads still go through whole when the rest comes.
  const std::string rest(static_cast<std::size_t>(kAnnounced) - 1024, 'b');
  ASSERT_TRUE(uploads[0]->send(rest));
  ASSERT_TRUE(uploads[0]->read_until([](const std::string& got) { return has_whole_response(got); }, 30s));
  EXPECT_THAT(uploads[0]->received(), HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(uploads[0]->received(), HasSubstr("Content-Length: " + std::to_string(kAnnounced)));
}

// A chunked body costs the gateway its decoded size, not its framing: 1 MiB sent as one-byte
// chunks (21 MiB on the wire) used to sit whole in the read buffer until the request ended.
TEST(ProxyTest, ChunkedRequestFramingIsNotKeptInMemory) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  const long before = peak_resident_kib(gw.process->pid());
  ASSERT_GT(before, 0);
  constexpr std::size_t kBody = 1 << 20;
  std::string request = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
  request.reserve(request.size() + kBody * 20 + 16);
  for (std::size_t i = 0; i < kBody; ++i) request += "000000000000001\r\na\r\n";
  request += "0\r\n\r\n";
  RawConnection client(gw.port);
  ASSERT_TRUE(client.send(request));
  ASSERT_TRUE(client.read_until(has_whole_response, 30s)) << client.received().substr(0, 300);
  EXPECT_THAT(client.received(), StartsWith("HTTP/1.1 200 OK\r\n"));
  const auto body = client.received().substr(client.received().find("\r\n\r\n") + 4);
  EXPECT_EQ(body, std::string(kBody, 'a'));
  const long after = peak_resident_kib(gw.process->pid());
  EXPECT_LT(after - before, 12 * 1024) << "peak resident memory grew from " << before << " to " << after << " KiB";
}

// A client set up for a forward proxy sends absolute-form targets: routed by their path like
// any other. CONNECT is refused; an HTTP/1.0 client is not sent an interim 100 Continue.
TEST(ProxyTest, AbsoluteFormTargetsAreRoutedByTheirPathAndConnectIsRefused) {
  auto mocks = start_mocks(2);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 2);
  auto models = raw_exchange(gw.port, "GET http://gateway.example:8000/v1/models HTTP/1.1\r\nHost: x\r\n"
                                      "Connection: close\r\n\r\n");
  ASSERT_THAT(models, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(models, HasSubstr("\"object\":\"list\""));
  EXPECT_THAT(models, Not(HasSubstr("X-Backend:")));  // the gateway's merged list, not one backend's
  // No path, a query: the path is "/" (the status page) and the query stays the query.
  auto page = raw_exchange(gw.port, "GET http://gateway.example:8000?next=/v1/models HTTP/1.1\r\nHost: x\r\n"
                                    "Connection: close\r\n\r\n");
  ASSERT_THAT(page, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(page, HasSubstr("text/html"));
  const auto body = chat_body(false);
  auto chat = raw_exchange(gw.port, "POST HTTP://gateway.example/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                    "Content-Type: application/json\r\nConnection: close\r\nContent-Length: " +
                                        std::to_string(body.size()) + "\r\n\r\n" + body);
  EXPECT_THAT(chat, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(chat, HasSubstr("chat.completion"));
  const auto connect = raw_exchange(gw.port, "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n");
  EXPECT_THAT(connect, StartsWith("HTTP/1.1 501 "));
  EXPECT_THAT(connect, HasSubstr("CONNECT is not supported"));
  // Targets that are neither a path nor an http(s) URL are refused by the gateway (a forwarded
  // one got the backend's 404).
  for (const std::string target : {"health", "v1/models", "ftp://gateway.example/v1/models", "*"}) {
    SCOPED_TRACE(target);
    const auto refused = raw_exchange(gw.port, "GET " + target + " HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_THAT(refused, StartsWith("HTTP/1.1 400 "));
    EXPECT_THAT(refused, HasSubstr("the target must be a path"));
  }
  // The head first, the body after a pause: an HTTP/1.1 client would be told to go on.
  RawConnection old_client(gw.port);
  ASSERT_TRUE(old_client.send("POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                              "Expect: 100-continue\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n"));
  EXPECT_FALSE(old_client.read_until([](const std::string& got) { return !got.empty(); }, 300ms))
      << old_client.received();
  ASSERT_TRUE(old_client.send(body));
  ASSERT_TRUE(old_client.read_until(has_whole_response));
  EXPECT_THAT(old_client.received(), StartsWith("HTTP/1.0 200 OK\r\n"));
}

// A head that arrives in pieces is refused as soon as a piece makes it malformed (a bare LF
// after a good request line), not after timeouts.client_header.
TEST(ProxyTest, AHeadGoingBadInALaterPieceIsRefusedAtOnce) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "timeouts.client_header=30s"}));
  wait_healthy(gw, 1);
  RawConnection client(gw.port);
  ASSERT_TRUE(client.send("GET /health HTTP/1.1\r\nHost: x\r\n"));
  EXPECT_FALSE(client.read_until([](const std::string& got) { return !got.empty(); }, 200ms));
  ASSERT_TRUE(client.send("Accept: y\n\n"));
  ASSERT_TRUE(client.read_until(has_whole_response, 3s)) << client.received();
  EXPECT_THAT(client.received(), StartsWith("HTTP/1.1 400 "));
}

TEST(ProxyTest, KeepAliveConnectionCarriesRequestsAfterAStream) {
  auto mocks = start_mocks(1, {"--tokens", "3"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  std::string stream = chat_body(true, R"("stream_options":{"include_usage":true})");
  std::string plain = chat_body(false);
  auto request = [](const std::string& body, bool close) {
    return "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
           std::string(close ? "Connection: close\r\n" : "") + "Content-Length: " + std::to_string(body.size()) +
           "\r\n\r\n" + body;
  };
  auto raw = raw_exchange(gw.port, request(stream, false) + request(stream, false) + request(plain, true));
  // Exactly three responses, each framed correctly: the stream's chunked body ends once.
  std::size_t responses = 0;
  for (std::size_t pos = 0; (pos = raw.find("HTTP/1.1 200 OK\r\n", pos)) != std::string::npos; ++pos) ++responses;
  EXPECT_EQ(responses, 3u) << raw;
  std::size_t last_chunks = 0;
  for (std::size_t pos = 0; (pos = raw.find("\r\n0\r\n\r\n", pos)) != std::string::npos; ++pos) ++last_chunks;
  EXPECT_EQ(last_chunks, 2u);
  EXPECT_TRUE(raw.ends_with("}")) << raw.substr(raw.size() - 100);  // the plain JSON answer, last
}

TEST(ProxyTest, OfficialOpenAiClientWorksUnchanged) {
  const std::string client_dir = std::string(INFERGATE_SOURCE_DIR) + "/tests/openai_client";
  ASSERT_EQ(access((client_dir + "/node_modules/openai").c_str(), R_OK), 0)
      << "run `npm ci` in tests/openai_client (deploy/test.sh does)";
  auto mocks = start_mocks(2);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 2);
  Process node("/usr/bin/env", {"node", client_dir + "/client.mjs", "http://127.0.0.1:" + std::to_string(gw.port) + "/v1"});
  std::string all_ok;
  EXPECT_NO_THROW(all_ok = node.wait_for_line(std::regex("ALL OK"), 60s)) << node.output() << node.errors();
  EXPECT_EQ(all_ok, "ALL OK");
  EXPECT_EQ(node.wait_exit(10s), 0) << node.errors();
}

// The gateway's refusals for want of room are what OpenAI's client retries: with one place and
// no queue, four requests at once get 429s with Retry-After and are all served in the end.
TEST(BackpressureTest, OfficialOpenAiClientRetriesTheQueuesRefusals) {
  const std::string client_dir = std::string(INFERGATE_SOURCE_DIR) + "/tests/openai_client";
  ASSERT_EQ(access((client_dir + "/node_modules/openai").c_str(), R_OK), 0)
      << "run `npm ci` in tests/openai_client (deploy/test.sh does)";
  auto mocks = start_mocks(1, {"--token-delay-ms", "100"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "limits.max_inflight_per_backend=1", "--set",
                                                       "limits.max_queued=0"}));
  wait_healthy(gw, 1);
  Process node("/usr/bin/env", {"node", client_dir + "/client.mjs",
                                "http://127.0.0.1:" + std::to_string(gw.port) + "/v1", "backpressure"});
  EXPECT_NO_THROW(node.wait_for_line(std::regex("ALL OK"), 60s)) << node.output() << node.errors();
  EXPECT_EQ(node.wait_exit(10s), 0) << node.errors();
  EXPECT_GE(metric(gw.port, "infergate_queue_rejected_total", "reason=\"full\""), 1);
  EXPECT_EQ(json::parse(http_request(mocks[0].port, "GET", "/mock/stats").body)["max_running"], 1);
}

namespace {
// A backend that answered one health probe, then stopped accepting: its listen queue is full,
// so the kernel drops new connection attempts and a connect can only time out.
struct StuckListener {
  net::io_context io;
  net::ip::tcp::acceptor acceptor{io};
  net::ip::tcp::socket probe{io};
  std::vector<int> fillers;
  int port = 0;

  StuckListener() {
    acceptor.open(net::ip::tcp::v4());
    acceptor.bind({net::ip::make_address("127.0.0.1"), 0});
    acceptor.listen(1);
    port = acceptor.local_endpoint().port();
  }
  // Answers the gateway's first probe on a connection it keeps.
  void answer_one_probe() {
    acceptor.accept(probe);
    beast::flat_buffer buffer;
    http::request<http::empty_body> req;
    http::read(probe, buffer, req);
    http::response<http::empty_body> res{http::status::ok, 11};
    res.prepare_payload();
    http::write(probe, res);
  }
  void fill_queue() {
    // Connections nobody accepts fill the queue (its length is the backlog plus one). Plain
    // non-blocking connects: Asio's synchronous connect would wait for the dropped SYN.
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<std::uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < 4; ++i) {
      int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
      fillers.push_back(fd);
    }
  }
  ~StuckListener() {
    for (int fd : fillers) ::close(fd);
  }
};
}  // namespace

TEST(ProxyTest, ConnectTimeoutAnswers504) {
  StuckListener stuck;
  auto gw = start_gateway({"--backend", "http://127.0.0.1:" + std::to_string(stuck.port), "--threads", "1",
                           "--set", "health.interval=1h", "--set", "timeouts.connect=300ms", "--set", "retries.max=0"});
  stuck.answer_one_probe();
  wait_healthy(gw, 1);
  stuck.fill_queue();
  const auto started = Clock::now();
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 504) << r.body << r.error;
  EXPECT_THAT(r.body, HasSubstr("no connection within timeouts.connect (300ms)"));
  EXPECT_LT(Clock::now() - started, 3s);
}

// An answer only the close ends (no length, not chunked), to a client that sent its next request
// while it came: the gateway lingers on the close, so the client reads all of it and then the
// end. A plain close with the next request unread made the kernel reset the connection and throw
// away what was not sent yet, and the client saw a cut body.
TEST(ProxyTest, ACloseDelimitedAnswerReachesAPipeliningClientWhole) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  const std::string body(1 << 20, 'x');
  const std::string answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body;
  RawConnection conn(gw.port);
  ASSERT_TRUE(conn.send("POST /mock/raw HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: " +
                        std::to_string(answer.size()) + "\r\n\r\n" + answer));
  ASSERT_TRUE(conn.read_until([](const std::string& got) { return got.find("\r\n\r\n") != std::string::npos; }));
  ASSERT_TRUE(conn.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  // The gateway has written the whole answer and closed the connection once it counts the request.
  ASSERT_TRUE(poll_until([&] { return metric(gw.port, "infergate_requests_total", "code=\"2xx\"") >= 1; }, 10s));
  EXPECT_TRUE(conn.wait_closed(10s));
  const auto& got = conn.received();
  const auto head_end = got.find("\r\n\r\n");
  ASSERT_NE(head_end, std::string::npos);
  EXPECT_EQ(got.size() - head_end - 4, body.size());
  // Lingering, the connection is still one of the client connections (with the scrape's own),
  // until the client ends it.
  EXPECT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_client_connections") == 2; }, 1s));
  conn.shutdown_write();
  EXPECT_TRUE(poll_until([&] { return gauge(gw.port, "infergate_client_connections") == 1; }, 10s));

  // The same while the gateway stops, with an answer larger than the sockets' buffers, so that
  // the gateway is still sending it when the signal comes and ends it during the drain: the
  // linger is over at once then, but the close resets nothing, and the client reads it all.
  const std::string big(16 << 20, 'y');
  const std::string big_answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + big;
  RawConnection second(gw.port);
  ASSERT_TRUE(second.send("POST /mock/raw HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: " +
                          std::to_string(big_answer.size()) + "\r\n\r\n" + big_answer));
  ASSERT_TRUE(second.read_until([](const std::string& got) { return got.find("\r\n\r\n") != std::string::npos; }));
  ASSERT_TRUE(second.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"2xx\""), 1);  // still being sent
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  EXPECT_TRUE(second.wait_closed(20s));
  const auto& after = second.received();
  EXPECT_EQ(after.size() - after.find("\r\n\r\n") - 4, big.size());
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
}

// How answers a backend frames oddly reach the client (the mock's /mock/raw sends its body back
// as the raw answer).
TEST(ProxyTest, OddlyFramedAnswersAreRelayedCleanly) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  auto relay = [&](const std::string& answer, const std::string& method = "POST", unsigned minor = 1) {
    const std::string head = method + " /mock/raw HTTP/1." + std::to_string(minor) +
                             "\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: ";
    return raw_exchange(gw.port, head + std::to_string(answer.size()) + "\r\n\r\n" + answer);
  };
  // Equal Content-Length fields (allowed in) go out as one.
  auto twice = relay("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi");
  EXPECT_THAT(twice, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_EQ(twice.find("Content-Length"), twice.rfind("Content-Length")) << twice;
  EXPECT_TRUE(twice.ends_with("\r\n\r\nhi")) << twice;
  // A status without a reason keeps none, rather than a made-up one.
  auto bare = relay("HTTP/1.1 299 \r\nContent-Length: 0\r\n\r\n");
  EXPECT_THAT(bare, StartsWith("HTTP/1.1 299 \r\n"));
  // Trailer announces the trailers that follow a chunked body: kept for an HTTP/1.1 client.
  auto trailed = relay("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                       "2\r\nhi\r\n0\r\nX-Sum: 7\r\n\r\n");
  EXPECT_THAT(trailed, HasSubstr("\r\nTrailer: X-Sum\r\n"));
  EXPECT_THAT(trailed, HasSubstr("0\r\nX-Sum: 7\r\n\r\n"));
  // An HTTP/1.0 client gets no Transfer-Encoding, even on an answer without a body.
  auto old_client = relay("HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", "POST", 0);
  EXPECT_THAT(old_client, StartsWith("HTTP/1.0 204 No Content\r\n"));
  EXPECT_EQ(old_client.find("Transfer-Encoding"), std::string::npos) << old_client;
  // A 204 says nothing of a body (it has none), whatever the backend put in its head.
  auto no_content = relay("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Kept: 1\r\n\r\n");
  EXPECT_THAT(no_content, StartsWith("HTTP/1.1 204 No Content\r\n"));
  EXPECT_THAT(no_content, HasSubstr("X-Kept: 1\r\n"));
  EXPECT_EQ(no_content.find("Content-Length"), std::string::npos) << no_content;
  // An answer without a body that says chunked and gives a length keeps the first only.
  auto not_modified = relay("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
  EXPECT_THAT(not_modified, StartsWith("HTTP/1.1 304 Not Modified\r\n"));
  EXPECT_THAT(not_modified, HasSubstr("Transfer-Encoding: chunked\r\n"));
  EXPECT_EQ(not_modified.find("Content-Length"), std::string::npos) << not_modified;
  // Token counts are read from the body's content, not its chunked framing: a chunk boundary
  // inside a number (12|34) still counts 1234.
  auto split = relay("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "1c\r\n{\"usage\":{\"prompt_tokens\":12\r\n1b\r\n34,\"completion_tokens\":56}}\r\n0\r\n\r\n");
  EXPECT_THAT(split, HasSubstr("\"prompt_tokens\":12\r\n1b\r\n34,")) << split;
  const auto labels = "backend=\"" + mocks[0].id() + "\",node=\"127.0.0.1\",slot=\"0\",kind=";
  EXPECT_TRUE(poll_until([&] { return metric(gw.port, "infergate_backend_tokens_total", labels + "\"completion\"") == 56; }, 5s));
  EXPECT_EQ(metric(gw.port, "infergate_backend_tokens_total", labels + "\"prompt\""), 1234);
}

TEST(ProxyTest, ExpectContinueIsAnsweredSoLargeUploadsDoNotStall) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  std::string body(2 << 20, 'p');  // curl asks for 100-continue above 1 MiB and waits 1 s for it
  const std::string head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nExpect: 100-continue\r\n"
                           "Connection: close\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n";
  auto raw = raw_exchange(gw.port, head + body);
  EXPECT_TRUE(raw.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")) << raw.substr(0, 200);
  EXPECT_TRUE(raw.ends_with(body));
  // Not forwarded: the gateway already has the body and the backend must not wait for it.
  const std::string chat = chat_body(false);
  auto echoed = raw_exchange(gw.port, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      "Expect: 100-continue\r\nX-Mock-Echo-Headers: 1\r\nConnection: close\r\n"
                                      "Content-Length: " + std::to_string(chat.size()) + "\r\n\r\n" + chat);
  auto received = json::parse(echoed.substr(echoed.rfind("\r\n\r\n") + 4), nullptr, false);
  ASSERT_TRUE(received.is_object()) << echoed;
  EXPECT_TRUE(received["received_headers"].contains("X-Mock-Echo-Headers"));
  EXPECT_FALSE(received["received_headers"].contains("Expect"));
}

TEST(ProxyTest, ChunkedRequestBodiesAreForwardedWhole) {
  auto mocks = start_mocks(1);
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  auto r = raw_exchange(gw.port,
                        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n");
  EXPECT_THAT(r, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(r, HasSubstr("\r\n\r\nhello world"));  // the backend got the body de-chunked
  auto broken = raw_exchange(gw.port,
                             "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n");
  EXPECT_THAT(broken, HasSubstr("HTTP/1.1 400"));
  EXPECT_THAT(broken, HasSubstr("malformed chunked request body"));
}

TEST(ProxyTest, Http10ClientsGetPlainBodiesAndAHostIsAdded) {
  auto mocks = start_mocks(1, {"--tokens", "3"});
  auto gw = start_gateway(backend_args(mocks));
  wait_healthy(gw, 1);
  const auto plain = chat_body(false);
  auto r = raw_exchange(gw.port, "POST /v1/chat/completions HTTP/1.0\r\nX-Mock-Echo-Headers: 1\r\n"
                                 "Content-Type: application/json\r\nContent-Length: " +
                                     std::to_string(plain.size()) + "\r\n\r\n" + plain);
  ASSERT_THAT(r, HasSubstr("HTTP/1.0 200"));
  auto body = json::parse(r.substr(r.find("\r\n\r\n") + 4));
  EXPECT_TRUE(body["received_headers"].contains("Host"));  // HTTP/1.1 backends require one

  // A chunked (SSE) answer reaches an HTTP/1.0 client de-chunked and ended by the close.
  const auto streamed = chat_body(true);
  auto s = raw_exchange(gw.port, "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                                 "Content-Length: " + std::to_string(streamed.size()) + "\r\n\r\n" + streamed);
  ASSERT_THAT(s, HasSubstr("HTTP/1.0 200"));
  const auto head_end = s.find("\r\n\r\n");
  EXPECT_EQ(s.substr(0, head_end).find("Transfer-Encoding"), std::string::npos);
  EXPECT_EQ(s.compare(head_end + 4, 6, "data: "), 0) << s;  // no chunk sizes
  EXPECT_THAT(s, HasSubstr("data: [DONE]"));
}

namespace {
std::unique_ptr<net::ip::tcp::socket> connect_client(net::io_context& io, int port) {
  auto sock = std::make_unique<net::ip::tcp::socket>(io);
  sock->connect({net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
  return sock;
}

void send_chat(net::ip::tcp::socket& sock) {
  http::request<http::string_body> req{http::verb::post, "/v1/chat/completions", 11};
  req.set(http::field::host, "gateway");
  req.set(http::field::content_type, "application/json");
  req.body() = chat_body(false);
  req.prepare_payload();
  http::write(sock, req);
}

// One response's status, or 0 if none is complete by the deadline, so that a broken gateway
// fails the test instead of hanging it. (SO_RCVTIMEO would not do: when recv times out, Asio's
// blocking read waits again, without a limit.)
unsigned read_status(net::ip::tcp::socket& sock,
                     std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::now() + 10s) {
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  while (!parser.is_done()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd readable{sock.native_handle(), POLLIN, 0};
    if (left.count() <= 0 || ::poll(&readable, 1, static_cast<int>(left.count())) <= 0) return 0;
    beast::error_code ec;
    http::read_some(sock, buffer, parser, ec);
    if (ec) return 0;
  }
  return parser.get().result_int();
}
}  // namespace

namespace {
// Continues a process stopped with SIGSTOP when the test leaves its scope.
struct ResumeOnExit {
  int pid;
  ~ResumeOnExit() { ::kill(pid, SIGCONT); }
};
}  // namespace

// The accept loop takes queued clients in batches of 64 per turn: with 200 waiting at once (the
// gateway is stopped while they connect and send), every batch after the first must follow.
TEST(ProxyTest, ABurstOfQueuedClientsLargerThanOneAcceptBatchIsServed) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url()});
  wait_healthy(gw, 1);
  net::io_context io;
  constexpr int kClients = 200;
  ASSERT_EQ(::kill(gw.process->pid(), SIGSTOP), 0);
  const ResumeOnExit resume{gw.process->pid()};  // also when a step below fails
  std::vector<std::unique_ptr<net::ip::tcp::socket>> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(connect_client(io, gw.port));  // the kernel completes the handshake
    send_chat(*clients.back());
  }
  ASSERT_EQ(::kill(gw.process->pid(), SIGCONT), 0);
  // One deadline for all of them, so that a gateway that stops accepting fails in seconds.
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  int ok = 0;
  for (auto& c : clients) ok += read_status(*c, deadline) == 200u ? 1 : 0;
  EXPECT_EQ(ok, kClients);
}

// A burst larger than limits.max_client_connections, all queued at once: each client is served
// once an earlier one has had its answer and left (served in whatever order the slots allow).
TEST(ProxyTest, AQueuedBurstPastTheConnectionLimitIsServedAsClientsLeave) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "limits.max_client_connections=8"});
  wait_healthy(gw, 1);
  net::io_context io;
  constexpr std::size_t kClients = 40;
  ASSERT_EQ(::kill(gw.process->pid(), SIGSTOP), 0);
  const ResumeOnExit resume{gw.process->pid()};  // also when a step below fails
  std::vector<std::unique_ptr<net::ip::tcp::socket>> clients;
  for (std::size_t i = 0; i < kClients; ++i) {
    clients.push_back(connect_client(io, gw.port));
    send_chat(*clients.back());
  }
  ASSERT_EQ(::kill(gw.process->pid(), SIGCONT), 0);
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  std::size_t served = 0;
  std::vector<bool> done(kClients, false);
  while (served < kClients && std::chrono::steady_clock::now() < deadline) {
    std::vector<pollfd> waiting;
    std::vector<std::size_t> index;
    for (std::size_t i = 0; i < kClients; ++i) {
      if (done[i]) continue;
      waiting.push_back({clients[i]->native_handle(), POLLIN, 0});
      index.push_back(i);
    }
    if (::poll(waiting.data(), waiting.size(), 1000) <= 0) continue;
    for (std::size_t k = 0; k < waiting.size(); ++k) {
      if ((waiting[k].revents & POLLIN) == 0) continue;
      const auto i = index[k];
      ASSERT_EQ(read_status(*clients[i], deadline), 200u) << "client " << i;
      clients[i]->close();  // its slot goes to a queued client
      done[i] = true;
      ++served;
    }
  }
  EXPECT_EQ(served, kClients);
}

// At the limit, busy connections keep their places and the next client waits in the listen
// backlog; once they are idle between requests, idle ones are closed to make room (as nginx
// does), so idle keep-alive clients cannot lock new ones out.
TEST(ProxyTest, ClientsPastMaxClientConnectionsWaitInTheBacklogAndAreServed) {
  auto mock = start_mock({"--tokens", "20", "--token-delay-ms", "50"});  // a second per answer
  auto gw = start_gateway({"--backend", mock.url(), "--set", "limits.max_client_connections=2", "--set",
                           "metrics.listen=127.0.0.1:0"});
  const int metrics_port =
      std::stoi(gw.process->wait_for_line(std::regex(R"(infergate metrics on http://127\.0\.0\.1:(\d+)/metrics)")));
  wait_healthy(gw, 1);
  auto gauge = [&](const std::string& name) { return infergate::test::gauge(metrics_port, name); };
  EXPECT_EQ(gauge("infergate_client_connections_limit"), 2);
  // Probe connections of wait_healthy are gone before the two held ones are counted.
  ASSERT_TRUE(poll_until([&] { return gauge("infergate_client_connections") == 0; }, 5s));

  net::io_context io;
  auto first = connect_client(io, gw.port);
  send_chat(*first);
  auto second = connect_client(io, gw.port);
  send_chat(*second);
  ASSERT_TRUE(poll_until([&] { return gauge("infergate_client_connections") == 2; }, 5s));

  // A third client connects (the kernel queues it) and sends its request: not answered while
  // the two others wait for theirs.
  auto third = connect_client(io, gw.port);
  send_chat(*third);
  pollfd pending{third->native_handle(), POLLIN, 0};
  EXPECT_EQ(::poll(&pending, 1, 300), 0) << "the gateway took a third connection past the limit of 2";
  EXPECT_EQ(gauge("infergate_client_connections"), 2);
  EXPECT_THAT(gw.process->errors(), HasSubstr("limits.max_client_connections"));

  // Both are answered and idle: one is closed to make room, and the waiting client is served,
  // nothing lost.
  EXPECT_EQ(read_status(*first), 200u);
  EXPECT_EQ(read_status(*second), 200u);
  EXPECT_EQ(read_status(*third), 200u);
  auto closed = [](net::ip::tcp::socket& sock) {
    pollfd p{sock.native_handle(), POLLIN, 0};
    char byte = 0;
    return ::poll(&p, 1, 2000) == 1 && ::recv(sock.native_handle(), &byte, 1, MSG_PEEK) == 0;
  };
  EXPECT_TRUE(closed(*first) || closed(*second)) << "neither idle connection was closed to make room";
}

// One backend, and a gateway whose timeouts.client_header is short and client_idle long, to
// tell which of the two a connection gets.
struct HeaderVsIdle {
  Mock mock;
  Gateway gw;
};
HeaderVsIdle start_header_vs_idle() {
  HeaderVsIdle s{start_mock(), {}};
  s.gw = start_gateway({"--backend", s.mock.url(), "--set", "timeouts.client_header=300ms", "--set",
                        "timeouts.client_idle=1h"});
  wait_healthy(s.gw, 1);
  return s;
}

// A connection that never sends a byte has timeouts.client_header, like a slow head; only a
// connection that was answered may idle for timeouts.client_idle.
TEST(ProxyTest, ASilentNewConnectionGetsTheHeaderTimeoutNotTheIdleOne) {
  auto setup = start_header_vs_idle();
  const auto& gw = setup.gw;
  RawConnection silent(gw.port);
  EXPECT_TRUE(silent.wait_closed(3s)) << "a silent connection was kept past timeouts.client_header";
  RawConnection answered(gw.port);
  ASSERT_TRUE(answered.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  ASSERT_TRUE(answered.read_until(has_whole_response));
  // After a streamed answer too (its relay hands the connection back to a new session).
  RawConnection streamed(gw.port);
  const auto body = chat_body(true);
  ASSERT_TRUE(streamed.send(raw_chat_request(body)));
  ASSERT_TRUE(streamed.read_until([](const std::string& got) { return got.find("\r\n0\r\n\r\n") != std::string::npos; }));
  EXPECT_FALSE(answered.wait_closed(1s)) << "an answered keep-alive connection was closed before timeouts.client_idle";
  EXPECT_FALSE(streamed.wait_closed(100ms)) << "a connection answered with a stream was closed before timeouts.client_idle";
}

// A stray CRLF after a request's body (some clients send one) leaves the connection idle
// between requests, with timeouts.client_idle, not in the middle of a head.
TEST(ProxyTest, AStrayCrlfAfterABodyLeavesTheConnectionIdle) {
  auto setup = start_header_vs_idle();
  const auto& gw = setup.gw;
  RawConnection client(gw.port);
  const auto body = chat_body(false);
  ASSERT_TRUE(client.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body + "\r\n"));
  ASSERT_TRUE(client.read_until(has_whole_response));
  EXPECT_THAT(client.received(), StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_FALSE(client.wait_closed(1s)) << "the connection was closed at timeouts.client_header";
  ASSERT_TRUE(client.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_TRUE(client.read_until([](const std::string& got) {
    return got.find("HTTP/1.1 200 OK", 1) != std::string::npos;
  }));
}

// timeouts.total limits each request, not the connection: a keep-alive client idle past the
// first request's limit is served again.
TEST(ProxyTest, TotalTimeoutIsPerRequestOnAKeepAliveConnection) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "timeouts.total=300ms"});
  wait_healthy(gw, 1);
  net::io_context io;
  auto client = connect_client(io, gw.port);
  send_chat(*client);
  ASSERT_EQ(read_status(*client), 200u);
  std::this_thread::sleep_for(500ms);  // the time that must pass: beyond the first request's limit
  send_chat(*client);
  EXPECT_EQ(read_status(*client), 200u);
}

namespace {

json mock_stats(const Mock& mock) { return json::parse(http_request(mock.port, "GET", "/mock/stats").body); }

// A chat completion sent from a thread of its own; result() waits for its answer.
class BackgroundChat {
 public:
  explicit BackgroundChat(int port)
      : thread_([this, port] { result_ = http_request(port, "POST", "/v1/chat/completions", chat_body(false), {}, 30s); }) {}
  const HttpResult& result() {
    if (thread_.joinable()) thread_.join();
    return result_;
  }

 private:
  HttpResult result_;
  std::jthread thread_;  // last: joined before result_ goes
};

bool queued_reaches(const Gateway& gw, double n) {
  return poll_until([&] { return gauge(gw.port, "infergate_queued_requests") == n; }, 10s);
}

// A healthy gateway in front of `backend` with one place on it (limits.max_inflight_per_backend=1),
// and the other `--set` settings given.
Gateway start_one_place_gateway(const Mock& backend, const std::vector<std::string>& settings) {
  std::vector<std::string> args{"--backend", backend.url(), "--set", "limits.max_inflight_per_backend=1"};
  for (const auto& setting : settings) {
    args.push_back("--set");
    args.push_back(setting);
  }
  auto gw = start_gateway(args);
  wait_healthy(gw, 1);
  return gw;
}

// The request running on `backend` takes its one place.
bool place_taken(const Gateway& gw, const Mock& backend) {
  return poll_until([&] { return inflight_on(gw.port, backend) == 1; }, 10s);
}
}  // namespace

// limits.max_inflight_per_backend: no backend ever runs more than its limit, and the requests
// past it wait in the gateway's queue and are all served, streamed or not.
TEST(BackpressureTest, NoBackendRunsMoreThanItsLimitAndTheRestWaitAndAreServed) {
  auto mocks = start_mocks(2, {"--token-delay-ms", "60", "--tokens", "5"});
  auto gw = start_gateway(concat(backend_args(mocks), {"--set", "limits.max_inflight_per_backend=2"}));
  wait_healthy(gw, 2);
  EXPECT_EQ(gauge(gw.port, "infergate_inflight_per_backend_limit"), 2);
  constexpr int kRequests = 12;
  std::vector<int> statuses(kRequests, 0);
  std::vector<std::string> bodies(kRequests);
  std::atomic<double> most_queued{0};
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    while (!done) {
      most_queued = std::max(most_queued.load(), gauge(gw.port, "infergate_queued_requests"));
      std::this_thread::sleep_for(10ms);
    }
  });
  std::vector<std::thread> clients;
  for (int i = 0; i < kRequests; ++i) {
    clients.emplace_back([&, i] {
      if (i % 2 == 0) {
        auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 30s);
        statuses[i] = r.status;
        bodies[i] = r.body;
      } else {
        auto r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 30s);
        statuses[i] = r.complete ? r.status : -r.status;
        bodies[i] = r.body();
      }
    });
  }
  for (auto& t : clients) t.join();
  done = true;
  watcher.join();
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(statuses[i], 200) << i << ": " << bodies[i];
    EXPECT_THAT(bodies[i], HasSubstr(i % 2 == 0 ? "\"usage\"" : "data: [DONE]")) << i;
  }
  int served = 0;
  for (const auto& m : mocks) {
    const auto stats = mock_stats(m);
    EXPECT_EQ(stats["max_running"], 2) << m.id();  // the limit, reached and never passed
    served += stats["requests"].get<int>();
  }
  EXPECT_EQ(served, kRequests);
  EXPECT_GT(most_queued.load(), 0);  // some did wait
  EXPECT_EQ(gauge(gw.port, "infergate_queued_requests"), 0);
  EXPECT_EQ(metric(gw.port, "infergate_queue_rejected_total", "reason=\"full\""), 0);
  EXPECT_EQ(metric(gw.port, "infergate_queue_rejected_total", "reason=\"timeout\""), 0);
}

// The queue is bounded: past limits.max_queued a request is answered 429 at once, and one that
// waits timeouts.queue without a place gets 503; both with Retry-After and an OpenAI error, and
// neither reaches the backend.
TEST(BackpressureTest, AFullQueueAnswers429AndAWaitPastTimeoutsQueue503) {
  auto mock = start_mock({"--token-delay-ms", "200", "--tokens", "10"});
  auto gw = start_one_place_gateway(mock, {"limits.max_queued=1", "timeouts.queue=600ms"});
  BackgroundChat first(gw.port);
  ASSERT_TRUE(place_taken(gw, mock));
  const auto queued_at = Clock::now();
  BackgroundChat queued(gw.port);
  ASSERT_TRUE(queued_reaches(gw, 1));
  auto refused = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  const auto& queued_answer = queued.result();
  const auto waited = Clock::now() - queued_at;
  EXPECT_EQ(refused.status, 429) << refused.body;
  EXPECT_EQ(refused.header("Retry-After"), "1");
  auto error = json::parse(refused.body)["error"];
  EXPECT_EQ(error["type"], "rate_limit_error");
  EXPECT_THAT(error["message"].get<std::string>(), HasSubstr("1 request(s) (limits.max_queued) already wait"));
  EXPECT_EQ(queued_answer.status, 503) << queued_answer.body;
  EXPECT_EQ(queued_answer.header("Retry-After"), "1");
  EXPECT_THAT(queued_answer.body, HasSubstr("no backend had room for the request within timeouts.queue (600ms)"));
  EXPECT_GE(waited, 600ms);
  EXPECT_EQ(first.result().status, 200) << first.result().body;
  EXPECT_EQ(mock_stats(mock)["requests"], 1);
  EXPECT_EQ(metric(gw.port, "infergate_queue_rejected_total", "reason=\"full\""), 1);
  EXPECT_EQ(metric(gw.port, "infergate_queue_rejected_total", "reason=\"timeout\""), 1);
  EXPECT_EQ(gauge(gw.port, "infergate_queued_requests"), 0);
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"4xx\""), 1);
}

// A queued request also takes a place that appears without one being given back: a backend
// added through the admin API serves it while the only other one is still busy.
TEST(BackpressureTest, AQueuedRequestGoesToABackendAddedWhileItWaits) {
  auto busy = start_mock({"--token-delay-ms", "300", "--tokens", "10"});
  auto added = start_mock();
  auto gw = start_one_place_gateway(busy, {"health.interval=100ms", "health.healthy_threshold=1"});
  BackgroundChat first(gw.port);
  ASSERT_TRUE(place_taken(gw, busy));
  BackgroundChat queued(gw.port);
  ASSERT_TRUE(queued_reaches(gw, 1));
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends", json{{"url", added.url()}}.dump()).status, 201);
  EXPECT_EQ(queued.result().status, 200) << queued.result().body;
  EXPECT_EQ(queued.result().header("X-Backend"), added.id());  // not after the busy one's 2.7 s answer
  EXPECT_EQ(inflight_on(gw.port, busy), 1);
  EXPECT_EQ(first.result().status, 200) << first.result().body;
}

// A client that leaves while its request is queued frees its queue place (within the queue's
// look period) and its request never reaches a backend; the shutdown's deadline answers the
// requests still queued with a 503 that says so.
TEST(BackpressureTest, ClientsLeavingTheQueueFreeTheirPlaceAndTheShutdownAnswersTheRest) {
  auto mock = start_mock({"--token-delay-ms", "500", "--tokens", "20"});
  auto gw = start_one_place_gateway(mock, {"limits.max_queued=1", "timeouts.shutdown=500ms"});
  BackgroundChat first(gw.port);
  ASSERT_TRUE(place_taken(gw, mock));
  {
    RawConnection leaving(gw.port);
    leaving.send(raw_chat_request(chat_body(false)));
    ASSERT_TRUE(queued_reaches(gw, 1));
  }  // closed while queued
  ASSERT_TRUE(queued_reaches(gw, 0));
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"client_closed\""), 1);
  // Its queue place is free again: the next request queues instead of getting 429.
  BackgroundChat queued(gw.port);
  ASSERT_TRUE(queued_reaches(gw, 1));
  ASSERT_EQ(::kill(gw.process->pid(), SIGTERM), 0);
  EXPECT_EQ(queued.result().status, 503) << queued.result().body;
  EXPECT_THAT(queued.result().body, HasSubstr("the gateway is shutting down"));
  EXPECT_EQ(queued.result().header("Retry-After"), "1");
  EXPECT_EQ(gw.process->wait_exit(10s), 0);
  EXPECT_EQ(mock_stats(mock)["requests"], 1);
}

// policy least_inflight: while one backend is busy with a long request, the others take the
// short ones (round robin would send every other one behind it), and no backend is skipped when
// all are idle.
TEST(BackpressureTest, LeastInflightSendsRequestsAwayFromABusyBackend) {
  auto mocks = start_mocks(2, {"--token-delay-ms", "100"});
  // One thread: a short request's place is given back before the next request is read (with
  // two, the next can be picked for on the other thread first, and then finds the two level).
  auto gw = start_gateway(concat(backend_args(mocks), {"--threads", "1", "--set", "policy=least_inflight"}));
  wait_healthy(gw, 2);
  std::set<std::string> idle_rotation;
  for (int i = 0; i < 2; ++i) {
    idle_rotation.insert(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false, "\"max_tokens\":1"))
                             .header("X-Backend"));
  }
  EXPECT_EQ(idle_rotation.size(), 2u);
  // Long: 30 tokens at 100 ms.
  HttpResult long_answer;
  std::jthread long_client([&] {
    long_answer = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false, "\"max_tokens\":30"), {}, 30s);
  });
  ASSERT_TRUE(poll_until([&] { return inflight_on(gw.port, mocks[0]) + inflight_on(gw.port, mocks[1]) == 1; }, 10s));
  const auto& busy = inflight_on(gw.port, mocks[0]) == 1 ? mocks[0] : mocks[1];
  const auto& free = &busy == &mocks[0] ? mocks[1] : mocks[0];
  for (int i = 0; i < 4; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false, "\"max_tokens\":1"));
    EXPECT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Backend"), free.id()) << "request " << i;
  }
  EXPECT_EQ(inflight_on(gw.port, busy), 1);  // the long one (2.9 s) was still running throughout
  long_client.join();
  EXPECT_EQ(long_answer.status, 200) << long_answer.body;
}

// timeouts.no_healthy_backend: a request that comes while the servers are still loading waits
// for one (in the queue) and is served; past the wait it gets the usual 503.
TEST(BackpressureTest, ARequestWaitsForAHealthyBackendWithinTimeoutsNoHealthyBackend) {
  auto loading = start_mock({"--startup-delay-ms", "1500"});
  auto gw = start_gateway({"--backend", loading.url(), "--set", "health.interval=200ms", "--set",
                           "health.healthy_threshold=1", "--set", "timeouts.no_healthy_backend=20s"});
  BackgroundChat early(gw.port);
  EXPECT_TRUE(queued_reaches(gw, 1));
  EXPECT_EQ(early.result().status, 200) << early.result().body;
  EXPECT_EQ(gauge(gw.port, "infergate_queued_requests"), 0);

  auto never = start_mock({"--startup-delay-ms", "600000"});
  auto gw2 = start_gateway({"--backend", never.url(), "--set", "health.interval=200ms", "--set",
                            "timeouts.no_healthy_backend=700ms"});
  const auto sent = Clock::now();
  auto r = http_request(gw2.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_GE(Clock::now() - sent, 700ms);
  EXPECT_EQ(r.status, 503) << r.body;
  EXPECT_EQ(r.header("Retry-After"), "1");
  EXPECT_THAT(r.body, HasSubstr("none of the 1 backends is healthy now (1 starting)"));
  EXPECT_EQ(json::parse(http_request(never.port, "GET", "/mock/stats").body)["requests"], 0);

  // The wait for a healthy backend is not time queued for room: with one place and
  // timeouts.queue=1s, the second of two early requests still waits its turn (0.6 s) once the
  // backend is up after 1.5 s.
  auto one_place = start_mock({"--startup-delay-ms", "1500", "--token-delay-ms", "100", "--tokens", "7"});
  auto gw3 = start_gateway({"--backend", one_place.url(), "--set", "health.interval=200ms", "--set",
                            "health.healthy_threshold=1", "--set", "timeouts.no_healthy_backend=20s", "--set",
                            "limits.max_inflight_per_backend=1", "--set", "timeouts.queue=1s"});
  BackgroundChat one(gw3.port);
  BackgroundChat two(gw3.port);
  EXPECT_EQ(one.result().status, 200) << one.result().body;
  EXPECT_EQ(two.result().status, 200) << two.result().body;
}

// A request waiting for a healthy backend (timeouts.no_healthy_backend) that finds one healthy
// but full queues for room under timeouts.queue, as a trainer started before its servers
// expects; it used to wait for room until the healthy wait's end and then got "none healthy".
TEST(BackpressureTest, AHealthyWaitThatFindsTheBackendFullQueuesForRoom) {
  // Healthy after about 2 s; the healthy wait ends about 2.5 s after the requests came, while
  // the first served still runs (1 s).
  auto loading = start_mock({"--startup-delay-ms", "2000", "--token-delay-ms", "100", "--tokens", "10"});
  auto gw = start_gateway({"--backend", loading.url(), "--set", "health.interval=200ms", "--set",
                           "health.healthy_threshold=1", "--set", "timeouts.no_healthy_backend=2500ms", "--set",
                           "limits.max_inflight_per_backend=1"});
  BackgroundChat one(gw.port);
  BackgroundChat two(gw.port);
  BackgroundChat three(gw.port);
  EXPECT_EQ(one.result().status, 200) << one.result().body;
  EXPECT_EQ(two.result().status, 200) << two.result().body;  // served one after the other
  EXPECT_EQ(three.result().status, 200) << three.result().body;
  EXPECT_EQ(mock_stats(loading)["max_running"], 1);

  // A full queue refuses the healthy wait with a 429 that says what it waited for.
  auto never = start_mock({"--startup-delay-ms", "600000"});
  auto gw2 = start_gateway({"--backend", never.url(), "--set", "timeouts.no_healthy_backend=5s", "--set",
                            "limits.max_queued=0"});
  auto r = http_request(gw2.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_THAT(r.body, HasSubstr("none of the backends is healthy now"));
  EXPECT_THAT(r.body, Not(HasSubstr("max_inflight_per_backend")));
}

// A request queued for room whose backends all leave rotation (here drained, as for a restart)
// waits timeouts.no_healthy_backend for one to come back instead of getting 503 at once.
TEST(BackpressureTest, AQueuedRequestWaitsForItsBackendToComeBack) {
  auto mock = start_mock({"--token-delay-ms", "100", "--tokens", "20"});
  auto gw = start_one_place_gateway(
      mock, {"health.interval=200ms", "health.healthy_threshold=1", "timeouts.no_healthy_backend=30s"});
  BackgroundChat running(gw.port);
  ASSERT_TRUE(place_taken(gw, mock));
  BackgroundChat queued(gw.port);
  ASSERT_TRUE(queued_reaches(gw, 1));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + mock.id() + "/drain").status, 200);
  // The running request ends (2 s) while the backend is drained; the queued one has looked at
  // least once meanwhile (every second) and found nothing in rotation.
  EXPECT_EQ(running.result().status, 200) << running.result().body;
  EXPECT_EQ(gauge(gw.port, "infergate_queued_requests"), 1);
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + mock.id() + "/undrain").status, 200);
  EXPECT_EQ(queued.result().status, 200) << queued.result().body;
  EXPECT_EQ(queued.result().header("X-Backend"), mock.id());
}

// A queued request whose wait timeouts.total ends while its backend is out of rotation is told
// that, not that the backends in rotation (none) are full.
TEST(BackpressureTest, AWaitEndedWhileNoBackendIsInRotationSaysSo) {
  auto mock = start_mock({"--token-delay-ms", "100", "--tokens", "10"});
  auto gw = start_one_place_gateway(mock, {"timeouts.no_healthy_backend=30s", "timeouts.total=2s"});
  BackgroundChat running(gw.port);
  ASSERT_TRUE(place_taken(gw, mock));
  BackgroundChat queued(gw.port);
  ASSERT_TRUE(queued_reaches(gw, 1));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + mock.id() + "/drain").status, 200);
  EXPECT_EQ(running.result().status, 200) << running.result().body;
  EXPECT_EQ(queued.result().status, 504) << queued.result().body;
  EXPECT_THAT(queued.result().body, HasSubstr("timeouts.total (2000ms) ran out while the request waited for a backend "
                                              "with room: no backend is in rotation now"));
}

// A backend the queue gives a request may be one added after the request came (absent from the
// snapshots the request holds) and removed while it serves it (DELETE drains it for
// timeouts.shutdown, then removes it with the request still running): the request holds it, so
// it is answered and the gateway lives on (a sanitizer build reported the backend used after it
// was freed).
TEST(BackpressureTest, ABackendAddedForAQueuedRequestAndRemovedUnderItIsHeldByTheRequest) {
  auto first = start_mock({"--token-delay-ms", "100", "--tokens", "30"});
  auto added = start_mock({"--token-delay-ms", "100", "--tokens", "30"});
  auto gw = start_one_place_gateway(first, {"timeouts.shutdown=300ms", "health.interval=100ms", "health.healthy_threshold=1"});
  BackgroundChat running(gw.port);
  ASSERT_TRUE(place_taken(gw, first));
  BackgroundChat queued(gw.port);
  ASSERT_TRUE(queued_reaches(gw, 1));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends", json{{"url", added.url()}}.dump()).status, 201);
  ASSERT_TRUE(poll_until([&] { return mock_stats(added)["running"] == 1; }, 10s));
  EXPECT_EQ(http_request(gw.port, "DELETE", "/admin/backends/" + added.id()).status, 202);
  ASSERT_TRUE(poll_until([&] { return http_request(gw.port, "GET", "/admin/backends/" + added.id()).status == 404; }, 10s));
  EXPECT_EQ(queued.result().status, 200) << queued.result().body << queued.result().error;
  EXPECT_EQ(queued.result().header("X-Backend"), added.id());
  EXPECT_EQ(running.result().status, 200);
  EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);
}
