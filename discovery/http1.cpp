#include "discovery/http1.hpp"

#include <array>
#include <cstring>

namespace infergate::http1 {
namespace {

constexpr std::array<bool, 256> make_token_table() {
  std::array<bool, 256> t{};
  for (int c = '0'; c <= '9'; ++c) t[static_cast<std::size_t>(c)] = true;
  for (int c = 'a'; c <= 'z'; ++c) t[static_cast<std::size_t>(c)] = true;
  for (int c = 'A'; c <= 'Z'; ++c) t[static_cast<std::size_t>(c)] = true;
  for (char c : std::string_view("!#$%&'*+-.^_`|~")) t[static_cast<unsigned char>(c)] = true;
  return t;
}
constexpr auto kToken = make_token_table();

bool is_token(std::string_view s) noexcept {
  if (s.empty()) return false;
  for (char c : s) {
    if (!kToken[static_cast<unsigned char>(c)]) return false;
  }
  return true;
}

char lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; }

std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Calls f(token) for each element of a comma-separated list, trimmed, skipping empty ones.
template <typename F>
void for_each_token(std::string_view list, F&& f) {
  while (!list.empty()) {
    auto comma = list.find(',');
    auto token = trim(list.substr(0, comma));
    if (!token.empty()) f(token);
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
}

bool parse_version(std::string_view v, unsigned& minor) noexcept {
  if (v.size() != 8 || v.substr(0, 7) != "HTTP/1." || v[7] < '0' || v[7] > '9') return false;
  minor = static_cast<unsigned>(v[7] - '0');
  return true;
}

Parse bad(Head& out, std::string_view why) {
  out.error = why;
  return Parse::kBad;
}

// Whether a field's value is acceptable (RFC 9110 5.5): visible characters, spaces, tabs and
// obs-text; no control characters (a bare LF inside a line is a smuggling vector, and a backend
// may drop the connection on the others).
bool valid_value(std::string_view value) noexcept {
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) return false;
  }
  return true;
}

// Understands the fields the proxy acts on.
Parse note_field(std::string_view name, std::string_view value, Head& out, bool is_request) {
  switch (lower(name[0])) {
    case 'c':
      if (iequals(name, "content-length")) {
        if (value.empty() || value.size() > 18) return bad(out, "invalid Content-Length");
        std::uint64_t n = 0;
        for (char c : value) {
          if (c < '0' || c > '9') return bad(out, "invalid Content-Length");
          n = n * 10 + static_cast<std::uint64_t>(c - '0');
        }
        if (out.content_length && *out.content_length != n) return bad(out, "conflicting Content-Length fields");
        out.content_length = n;
      } else if (iequals(name, "connection")) {
        for_each_token(value, [&](std::string_view t) {
          if (iequals(t, "close")) out.connection_close = true;
          else if (iequals(t, "keep-alive")) out.connection_keep_alive = true;
          out.connection_options.push_back(t);
        });
        if (out.connection_options.size() > kMaxConnectionOptions) return bad(out, "too many Connection options");
      }
      break;
    case 't':
      if (iequals(name, "transfer-encoding")) {
        // A request must say exactly `chunked`, once: the gateway re-frames the body and
        // cannot pass on a coding it did not apply. A response may stack codings before
        // `chunked` (relayed as they are).
        std::string_view last;
        unsigned tokens = 0;
        for_each_token(value, [&](std::string_view t) {
          last = t;
          ++tokens;
        });
        ++out.encoding_fields;
        out.chunked = iequals(last, "chunked") && (!is_request || (tokens == 1 && out.encoding_fields == 1));
        out.other_encoding = !out.chunked;
      }
      break;
    case 'h':
      if (is_request && iequals(name, "host")) ++out.host_fields;
      break;
    case 'e':
      if (is_request && iequals(name, "expect") && iequals(value, "100-continue")) out.expect_continue = true;
      break;
    default:
      break;
  }
  return Parse::kComplete;
}

Parse parse_request_line(std::string_view line, Head& out) {
  const auto sp1 = line.find(' ');
  if (sp1 == std::string_view::npos) return bad(out, "malformed request line");
  const auto sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) return bad(out, "malformed request line");
  out.method = line.substr(0, sp1);
  out.target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  if (!is_token(out.method)) return bad(out, "invalid request method");
  if (out.target.empty()) return bad(out, "empty request target");
  for (char c : out.target) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= ' ' || u >= 0x7f) return bad(out, "invalid character in the request target");
    // A fragment is the client's own and never sent (RFC 9112 3.2); a backend would read it as
    // part of the path.
    if (c == '#') return bad(out, "fragment in the request target");
  }
  if (!parse_version(line.substr(sp2 + 1), out.version_minor)) return bad(out, "unsupported HTTP version");
  return Parse::kComplete;
}

Parse parse_status_line(std::string_view line, Head& out) {
  if (line.size() < 12 || !parse_version(line.substr(0, 8), out.version_minor) || line[8] != ' ') {
    return bad(out, "malformed status line");
  }
  unsigned status = 0;
  for (std::size_t i = 9; i < 12; ++i) {
    if (line[i] < '0' || line[i] > '9') return bad(out, "malformed status code");
    status = status * 10 + static_cast<unsigned>(line[i] - '0');
  }
  if (status < 100 || status > 599) return bad(out, "malformed status code");
  if (line.size() > 12 && line[12] != ' ') return bad(out, "malformed status line");
  out.status = status;
  out.reason = line.size() > 13 ? line.substr(13) : std::string_view{};
  // The reason is relayed: a bare LF in it would give the client a line of the backend's making.
  if (!valid_value(out.reason)) return bad(out, "invalid character in the status line");
  return Parse::kComplete;
}

// One pass over the head: each line found by its CR, the fields split and checked as they
// come. `start_line` gets the first line; the caller parses it.
Parse parse_head(std::string_view data, std::size_t max_head, bool is_request, Head& out,
                 std::string_view& start_line) {
  std::size_t pos = 0;
  if (is_request) {
    // A client may send stray CRLFs between requests (RFC 9112 2.2).
    while (pos + 1 < data.size() && pos < 8 && data[pos] == '\r' && data[pos + 1] == '\n') pos += 2;
  }
  const std::size_t limit = std::min(data.size(), max_head);
  bool first = true;
  // What is missing is still to come, unless what came already cannot start a valid head: a
  // bare-LF line, or (for a request) a method that is not a token, e.g. a TLS handshake, are
  // answered at once rather than after timeouts.client_header.
  const auto incomplete = [&]() -> Parse {
    if (pos < limit && std::memchr(data.data() + pos, '\n', limit - pos) != nullptr) return bad(out, "bad line ending");
    if (first && is_request) {
      for (std::size_t i = pos; i < limit && data[i] != ' '; ++i) {
        if (data[i] == '\r' && i + 1 == limit) break;  // maybe half of a stray CRLF
        if (!kToken[static_cast<unsigned char>(data[i])]) return bad(out, "invalid request method");
      }
    }
    return data.size() >= max_head ? Parse::kTooLarge : Parse::kIncomplete;
  };
  for (;;) {
    if (pos >= limit) return incomplete();
    const void* cr = std::memchr(data.data() + pos, '\r', limit - pos);
    if (cr == nullptr) return incomplete();
    const auto eol = static_cast<std::size_t>(static_cast<const char*>(cr) - data.data());
    if (eol + 1 >= limit) return incomplete();
    if (data[eol + 1] != '\n') return bad(out, first ? "bad line ending" : "bad line ending in a header field");
    const auto line = data.substr(pos, eol - pos);
    pos = eol + 2;
    if (first) {
      // Checked now, before the fields arrive: HTTP/0.9 or a garbled line is answered at once.
      if (auto r = is_request ? parse_request_line(line, out) : parse_status_line(line, out); r != Parse::kComplete) {
        return r;
      }
      start_line = line;
      first = false;
      continue;
    }
    if (line.empty()) break;  // the blank line: the head is complete
    if (line.front() == ' ' || line.front() == '\t') return bad(out, "obsolete line folding in a header field");
    std::size_t colon = 0;
    while (colon < line.size() && kToken[static_cast<unsigned char>(line[colon])]) ++colon;
    if (colon == line.size() || line[colon] != ':' || colon == 0) {
      if (line.find('\n') != std::string_view::npos) return bad(out, "bad line ending in a header field");
      if (line.find(':') == std::string_view::npos) return bad(out, "header field without a colon");
      return bad(out, "invalid header field name");
    }
    const auto name = line.substr(0, colon);
    const auto value = trim(line.substr(colon + 1));
    if (!valid_value(value)) {
      return bad(out, value.find('\n') != std::string_view::npos ? "bad line ending in a header field"
                                                                  : "invalid character in a header field value");
    }
    out.fields.push_back(Field{name, value});
    if (auto r = note_field(name, value, out, is_request); r != Parse::kComplete) return r;
  }
  out.size = pos;
  if (out.chunked || out.other_encoding) {
    if (is_request && out.content_length) {
      return bad(out, "both Content-Length and Transfer-Encoding");  // a smuggling attempt
    }
    if (out.other_encoding) return bad(out, "unsupported Transfer-Encoding");
    // HTTP/1.0 has no Transfer-Encoding: a proxy before us may have framed this body otherwise,
    // so its framing cannot be trusted (RFC 9112 6.1).
    if (is_request && out.version_minor == 0) return bad(out, "Transfer-Encoding in an HTTP/1.0 request");
    out.content_length.reset();  // a response's Transfer-Encoding overrides Content-Length
  }
  if (is_request && out.host_fields > 1) return bad(out, "more than one Host field");
  if (is_request && out.host_fields == 0 && out.version_minor >= 1) return bad(out, "missing Host field");
  return Parse::kComplete;
}

void reset(Head& out) {
  auto fields = std::move(out.fields);
  auto options = std::move(out.connection_options);
  fields.clear();
  options.clear();
  out = Head{};
  out.fields = std::move(fields);
  out.connection_options = std::move(options);
}

}  // namespace

bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::string_view Head::find(std::string_view name) const noexcept {
  for (const auto& f : fields) {
    if (iequals(f.name, name)) return f.value;
  }
  return {};
}

bool Head::has(std::string_view name) const noexcept {
  for (const auto& f : fields) {
    if (iequals(f.name, name)) return true;
  }
  return false;
}

Parse parse_request(std::string_view data, std::size_t max_head, Head& out) {
  reset(out);
  std::string_view line;
  return parse_head(data, max_head, true, out, line);
}

Parse parse_response(std::string_view data, std::size_t max_head, Head& out) {
  reset(out);
  std::string_view line;
  return parse_head(data, max_head, false, out, line);
}

bool is_hop_by_hop(std::string_view name, const std::vector<std::string_view>& connection_options) noexcept {
  static constexpr std::array<std::string_view, 7> kHopByHop = {
      "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"};
  for (auto h : kHopByHop) {
    if (iequals(name, h)) return true;
  }
  // The framing and the Host are never the sender's to withdraw: dropping Content-Length or
  // Transfer-Encoding would leave the receiver unable to find the end of the body.
  if (iequals(name, "content-length") || iequals(name, "transfer-encoding") || iequals(name, "host")) return false;
  for (auto option : connection_options) {
    if (iequals(option, name)) return true;
  }
  return false;
}

Decimal::Decimal(std::uint64_t v) noexcept : buf{}, start(sizeof(buf)) {
  do {
    buf[--start] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
}

BodyFramer::Step BodyFramer::step(std::string_view data, ContentSink sink) {
  Step out;
  switch (kind_) {
    case Kind::kNone:
      out.last = true;
      break;
    case Kind::kLength:
      out.consumed = static_cast<std::size_t>(std::min<std::uint64_t>(remaining_, data.size()));
      remaining_ -= out.consumed;
      out.last = remaining_ == 0;
      out.payload = data.substr(0, out.consumed);
      sink(out.payload);
      break;
    case Kind::kChunked: {
      decoded_.clear();
      auto r = dechunk_ ? decoder_.feed(data,
                                        [this, sink](std::string_view d) {
                                          decoded_.append(d);
                                          sink(d);
                                        })
                        : decoder_.feed(data, sink);
      out.consumed = r.consumed;
      out.last = r.done;
      out.bad = r.bad;
      out.payload = dechunk_ ? std::string_view(decoded_) : data.substr(0, r.consumed);
      break;
    }
    case Kind::kUntilClose:
      out.consumed = data.size();
      out.payload = data;
      out.last = eof_;
      sink(out.payload);
      break;
  }
  return out;
}

std::pair<char*, std::size_t> ByteBuffer::prepare(std::size_t min_free, std::size_t max_capacity) {
  if (capacity_ - end_ < min_free) {
    if (capacity_ - size() >= min_free && buf_) {
      std::memmove(buf_.get(), buf_.get() + begin_, size());
      end_ -= begin_;
      begin_ = 0;
    } else {
      reallocate(capacity_for(min_free, max_capacity));
    }
  }
  return {buf_.get() + end_, capacity_ - end_};
}

void ByteBuffer::reallocate(std::size_t capacity) {
  capacity = std::max(capacity, size());
  auto fresh = std::make_unique_for_overwrite<char[]>(capacity);
  if (size() > 0) std::memcpy(fresh.get(), buf_.get() + begin_, size());
  end_ = size();
  begin_ = 0;
  buf_ = std::move(fresh);
  capacity_ = capacity;
}

}  // namespace infergate::http1
