// infergate-sse-load: opens N concurrent streaming chat requests against a URL and reports how
// the streams went (time to first event, events relayed, failures) as one JSON line: events_per_s
// over the whole run, steady_events_per_s while every stream is open (after the ramp, until the
// first one ends), and peak_open, the most streams open at once. No Debian load tool holds
// thousands of slow SSE streams open and times their first byte.
//
// usage: infergate-sse-load --port P [--host H] [--streams N] [--tokens T] [--ramp-ms MS]
//                            [--ttfb-log FILE]   (one line per stream: index, sent at us, ttfb us)
#include <sys/resource.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
constexpr auto kTuple = net::as_tuple(net::use_awaitable);
constexpr auto kSlot = std::chrono::milliseconds(10);

namespace {

struct Options {
  std::string host = "127.0.0.1";
  int port = 0;
  int streams = 100;
  int tokens = 64;
  int ramp_ms = 1000;  // spread the connection opening over this long
  std::string ttfb_log;
};

struct Totals {
  std::vector<double> ttfb_us;  // request sent -> first body byte
  struct Trace {
    int index;
    double sent_us;  // since the run started
    double ttfb_us;
  };
  std::vector<Trace> trace;
  Clock::time_point started = Clock::now();
  // Events by the 10 ms slot they were read in, since `started`: the rate while every stream is
  // open (after the ramp, before the first stream ends) is read off these.
  std::vector<std::uint32_t> slots;
  Clock::time_point first_done = Clock::time_point::max();
  int open = 0;       // streams with their head read and their body not yet done
  int peak_open = 0;  // the most open at once: what the target held concurrently
  std::uint64_t events = 0;
  int ok = 0;
  int failed = 0;
  std::string last_error;
};

net::awaitable<void> one_stream(const Options* o, int index, Totals* totals) {
  auto ex = co_await net::this_coro::executor;
  if (o->ramp_ms > 0 && o->streams > 1) {
    net::steady_timer delay(ex, std::chrono::microseconds(static_cast<std::int64_t>(index) * o->ramp_ms * 1000 / o->streams));
    co_await delay.async_wait(kTuple);
  }
  beast::tcp_stream stream(ex);
  stream.expires_after(std::chrono::minutes(5));
  auto [cec] = co_await stream.async_connect(tcp::endpoint(net::ip::make_address(o->host), static_cast<unsigned short>(o->port)), kTuple);
  if (cec) {
    ++totals->failed;
    totals->last_error = "connect: " + cec.message();
    co_return;
  }
  http::request<http::string_body> req{http::verb::post, "/v1/chat/completions", 11};
  req.set(http::field::host, o->host);
  req.set(http::field::content_type, "application/json");
  req.body() = R"({"model":"bench-model","stream":true,"max_tokens":)" + std::to_string(o->tokens) +
               R"(,"messages":[{"role":"user","content":"hello"}]})";
  req.prepare_payload();
  const auto sent = Clock::now();
  auto [wec, wn] = co_await http::async_write(stream, req, kTuple);
  if (wec) {
    ++totals->failed;
    totals->last_error = "write: " + wec.message();
    co_return;
  }
  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  auto [hec, hn] = co_await http::async_read_header(stream, buffer, parser, kTuple);
  if (hec || parser.get().result_int() != 200) {
    ++totals->failed;
    totals->last_error = hec ? "header: " + hec.message() : "status " + std::to_string(parser.get().result_int());
    co_return;
  }
  // Open from the head to the end of the body (or its failure), whichever way it ends.
  struct OpenStream {
    Totals* t;
    explicit OpenStream(Totals* totals) : t(totals) { t->peak_open = std::max(t->peak_open, ++t->open); }
    ~OpenStream() {  // the first stream to end, however, ends the window with every stream open
      --t->open;
      t->first_done = std::min(t->first_done, Clock::now());
    }
    OpenStream(const OpenStream&) = delete;
    OpenStream& operator=(const OpenStream&) = delete;
  } open_stream(totals);
  char buf[8192];
  bool first = true;
  std::uint64_t events = 0;
  std::string tail;  // to spot "data: " across read boundaries
  while (!parser.is_done()) {
    parser.get().body().data = buf;
    parser.get().body().size = sizeof buf;
    auto [rec, rn] = co_await http::async_read_some(stream, buffer, parser, kTuple);
    if (rec == http::error::need_buffer) rec = {};
    if (rec) {
      ++totals->failed;
      totals->last_error = "body: " + rec.message();
      co_return;
    }
    const auto n = sizeof buf - parser.get().body().size;
    if (n == 0) continue;
    if (first) {
      const double ttfb = std::chrono::duration<double, std::micro>(Clock::now() - sent).count();
      totals->ttfb_us.push_back(ttfb);
      totals->trace.push_back({index, std::chrono::duration<double, std::micro>(sent - totals->started).count(), ttfb});
      first = false;
    }
    std::string text = tail + std::string(buf, n);
    const auto before = events;
    for (std::size_t pos = 0; (pos = text.find("data: ", pos)) != std::string::npos; pos += 6) {
      if (pos >= tail.size() || pos + 6 > tail.size()) ++events;
    }
    tail = text.substr(text.size() >= 5 ? text.size() - 5 : 0);
    if (events != before) {
      const auto slot = static_cast<std::size_t>((Clock::now() - totals->started) / kSlot);
      if (slot >= totals->slots.size()) totals->slots.resize(slot + 1, 0);
      totals->slots[slot] += static_cast<std::uint32_t>(events - before);
    }
  }
  totals->events += events;
  ++totals->ok;
}

int parse_int(const std::string& flag, const char* v) {
  char* end = nullptr;
  long n = std::strtol(v, &end, 10);
  if (*end != '\0' || n < 0) {
    std::cerr << "infergate-sse-load: bad value for " << flag << "\n";
    std::exit(2);
  }
  return static_cast<int>(n);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) {
      std::cerr << "infergate-sse-load: " << a << " needs a value\n";
      return 2;
    }
    if (a == "--host") o.host = argv[++i];
    else if (a == "--port") o.port = parse_int(a, argv[++i]);
    else if (a == "--streams") o.streams = parse_int(a, argv[++i]);
    else if (a == "--tokens") o.tokens = parse_int(a, argv[++i]);
    else if (a == "--ramp-ms") o.ramp_ms = parse_int(a, argv[++i]);
    else if (a == "--ttfb-log") o.ttfb_log = argv[++i];
    else {
      std::cerr << "infergate-sse-load: unknown flag " << a << "\n";
      return 2;
    }
  }
  if (o.port == 0) {
    std::cerr << "usage: infergate-sse-load --port P [--host H] [--streams N] [--tokens T] [--ramp-ms MS] [--ttfb-log FILE]\n";
    return 2;
  }
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
  net::io_context io(1);
  Totals totals;
  const auto started = totals.started;
  for (int i = 0; i < o.streams; ++i) net::co_spawn(io, one_stream(&o, i, &totals), net::detached);
  io.run();
  const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
  if (!o.ttfb_log.empty()) {
    if (std::FILE* f = std::fopen(o.ttfb_log.c_str(), "w")) {
      for (const auto& r : totals.trace) std::fprintf(f, "%d %.0f %.0f\n", r.index, r.sent_us, r.ttfb_us);
      std::fclose(f);
    } else {
      std::cerr << "infergate-sse-load: cannot write " << o.ttfb_log << "\n";
    }
  }
  // The rate while all streams are open: from the end of the ramp (plus a slot for the last
  // head) to the first stream's end. A target that holds fewer streams than asked (a descriptor
  // limit keeps the rest waiting to be accepted) shows it in peak_open, not in a diluted rate.
  double steady = 0;
  const auto from = static_cast<std::size_t>(std::chrono::milliseconds(o.ramp_ms) / kSlot) + 1;
  if (totals.first_done != Clock::time_point::max()) {
    const auto to = std::min(static_cast<std::size_t>((totals.first_done - started) / kSlot), totals.slots.size());
    if (to >= from + 10) {  // at least 100 ms
      std::uint64_t in_window = 0;
      for (auto i = from; i < to; ++i) in_window += totals.slots[i];
      steady = static_cast<double>(in_window) / std::chrono::duration<double>(kSlot * (to - from)).count();
    }
  }
  auto& t = totals.ttfb_us;
  std::sort(t.begin(), t.end());
  auto pct = [&](double p) { return t.empty() ? 0.0 : t[std::min(t.size() - 1, static_cast<std::size_t>(p * static_cast<double>(t.size())))]; };
  std::printf(
      "{\"streams\":%d,\"ok\":%d,\"failed\":%d,\"events\":%llu,\"seconds\":%.3f,\"events_per_s\":%.0f,"
      "\"steady_events_per_s\":%.0f,\"peak_open\":%d,\"ttfb_p50_us\":%.0f,\"ttfb_p99_us\":%.0f,\"last_error\":\"%s\"}\n",
      o.streams, totals.ok, totals.failed, static_cast<unsigned long long>(totals.events), seconds,
      static_cast<double>(totals.events) / seconds, steady, totals.peak_open, pct(0.5), pct(0.99),
      totals.last_error.c_str());
  return totals.failed == 0 ? 0 : 1;
}
