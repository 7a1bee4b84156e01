// Fuzz target for everything infergate parses from the outside: HTTP/1.1 request and response
// heads, chunked and length-framed bodies in arbitrary pieces, Slurm hostlists, the token usage
// scanner, configuration values (durations, sizes, addresses) and configuration files. Built for libFuzzer with clang (tests/fuzz/run.sh); with any compiler the same
// function runs over the checked-in corpus as a ctest (replay_main.cpp).
//
// The first input byte picks what is fuzzed and how the rest is cut into pieces; the checks are
// the invariants the gateway relies on: views stay inside the input, a body never consumes more
// than it was given, and nothing throws but HostlistError and ConfigError (a configuration
// error must name the key and the file, not surface as a YAML library exception).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "config/units.hpp"
#include "discovery/http1.hpp"
#include "gateway/usage_scanner.hpp"
#include "slurm/hostlist.hpp"

namespace {

using namespace infergate;

void require(bool ok) {
  if (!ok) std::abort();  // the fuzzer reports the input
}

bool inside(std::string_view part, std::string_view whole) {
  if (part.empty()) return true;
  return part.data() >= whole.data() && part.data() + part.size() <= whole.data() + whole.size();
}

void check_head(const http1::Head& h, std::string_view data) {
  require(h.size <= data.size());
  const auto head = data.substr(0, h.size);
  require(inside(h.method, head) && inside(h.target, head) && inside(h.reason, head));
  require(h.connection_options.size() <= http1::kMaxConnectionOptions);
  for (auto option : h.connection_options) require(inside(option, head));
  for (const auto& f : h.fields) require(inside(f.name, head) && inside(f.value, head));
  require(!(h.chunked && h.other_encoding));
}

// Feeds `body` to a framer in pieces of `cut` bytes, the way relay_response reads them.
void frame(http1::BodyFramer framer, std::string_view body, std::size_t cut) {
  std::string buffered;
  std::size_t fed = 0;
  for (int rounds = 0; rounds < 100000; ++rounds) {
    const auto step = framer.step(buffered);
    require(step.consumed <= buffered.size());
    if (step.bad || step.last) return;
    buffered.erase(0, step.consumed);
    if (fed == body.size()) {
      if (framer.kind() == http1::BodyFramer::Kind::kUntilClose) {
        framer.end_of_stream();
        const auto end = framer.step(buffered);
        require(end.consumed <= buffered.size());
        return;
      }
      return;  // waits for bytes that never come: the idle timeout ends it
    }
    const auto n = std::min(cut, body.size() - fed);
    buffered.append(body.substr(fed, n));
    fed += n;
  }
  std::abort();  // no progress: a framer that loops
}

http1::BodyFramer framer_for(const http1::Head& h, bool dechunk) {
  using Kind = http1::BodyFramer::Kind;
  if (h.chunked) return http1::BodyFramer(Kind::kChunked, 0, dechunk);
  if (h.content_length) return http1::BodyFramer(Kind::kLength, *h.content_length, false);
  return http1::BodyFramer(Kind::kUntilClose, 0, false);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  if (size == 0) return 0;
  const unsigned mode = bytes[0] % 7;
  const std::size_t cut = 1 + bytes[0] / 7 % 32;  // piece size for bodies and the scanner
  const std::string copy(reinterpret_cast<const char*>(bytes + 1), size - 1);
  const std::string_view data = copy;
  const std::size_t max_head = 64 + data.size() / 2;  // some inputs hit the limit, some do not
  http1::Head head;
  switch (mode) {
    case 0: {
      const auto parsed = http1::parse_request(data, max_head, head);
      if (parsed == http1::Parse::kComplete) {
        check_head(head, data);
        http1::ChunkedDecoder decoder;
        std::size_t out = 0;
        auto rest = data.substr(head.size);
        while (!rest.empty()) {
          const auto piece = rest.substr(0, cut);
          const auto r = decoder.feed(piece, [&](std::string_view d) { out += d.size(); });
          require(r.consumed <= piece.size());
          if (r.bad || r.done) break;
          rest.remove_prefix(r.consumed);
          require(r.consumed == piece.size());  // not done: it wants more
        }
        require(out <= data.size());
      }
      break;
    }
    case 1:
    case 2: {
      const auto parsed = http1::parse_response(data, max_head, head);
      if (parsed == http1::Parse::kComplete) {
        check_head(head, data);
        frame(framer_for(head, mode == 2), data.substr(head.size), cut);
      }
      break;
    }
    case 3: {
      try {
        const auto hosts = slurm::expand_hostlist(data, 4096);
        require(hosts.size() <= 4096);
      } catch (const slurm::HostlistError&) {
      }
      break;
    }
    case 4: {
      gateway::UsageScanner scanner;
      for (std::size_t at = 0; at < data.size(); at += cut) scanner.feed(data.substr(at, cut));
      break;
    }
    case 5: {
      // What is accepted prints back to text that parses to the same value (dump_config and
      // the error messages print values this way).
      if (const auto d = config::parse_duration(data)) {
        require(d->count() >= 0);
        require(config::parse_duration(config::format_duration(*d)) == d);
      }
      if (const auto n = config::parse_size(data)) require(config::parse_size(config::format_size(*n)) == n);
      if (const auto e = config::parse_endpoint(data)) {
        const auto again = config::parse_endpoint(e->to_string());
        require(again && again->host == e->host && again->port == e->port);
      }
      break;
    }
    case 6: {
      try {
        (void)config::parse_yaml_text(data, "fuzz.yaml");
      } catch (const config::ConfigError&) {
      }
      break;
    }
  }
  return 0;
}
