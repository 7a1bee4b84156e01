// HTTP/1.1 message heads and chunked framing for the proxy's hot path and the health prober:
// parsed in place (views into the read buffer), no allocation per field, no I/O. The proxy
// forwards bytes and only needs to know where a message ends and which fields describe the
// connection.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace infergate::http1 {

struct Field {
  std::string_view name;
  std::string_view value;
};

enum class Parse {
  kIncomplete,  // the head's end is not in the data yet
  kComplete,
  kBad,         // malformed (400); Head::error says why
  kTooLarge,    // the head exceeds the limit (431)
};

struct Head {
  // Request line.
  std::string_view method;
  std::string_view target;
  // Status line.
  unsigned status = 0;
  std::string_view reason;

  unsigned version_minor = 1;  // HTTP/1.<minor>
  std::size_t size = 0;        // bytes of the head, including the blank line
  std::vector<Field> fields;   // reused between messages: cleared, capacity kept

  std::optional<std::uint64_t> content_length;
  bool chunked = false;            // Transfer-Encoding ends in chunked
  bool other_encoding = false;     // a Transfer-Encoding that does not end in chunked
  bool connection_close = false;
  bool connection_keep_alive = false;
  bool expect_continue = false;
  unsigned host_fields = 0;        // Host fields seen (a request needs exactly one in HTTP/1.1)
  unsigned encoding_fields = 0;    // Transfer-Encoding fields seen
  // The options of every Connection field, for hop-by-hop names (at most kMaxConnectionOptions).
  std::vector<std::string_view> connection_options;
  std::string_view error;          // for kBad

  // `close` wins over `keep-alive` in either version (RFC 9112 9.3).
  bool keep_alive() const noexcept {
    return !connection_close && (version_minor >= 1 || connection_keep_alive);
  }
  // The first field's value with this name (ASCII case-insensitive), or empty.
  std::string_view find(std::string_view name) const noexcept;
  bool has(std::string_view name) const noexcept;
};

// Parses a request head at the start of `data`. Up to `max_head` bytes may belong to the head.
Parse parse_request(std::string_view data, std::size_t max_head, Head& out);
// Parses a response head at the start of `data`.
Parse parse_response(std::string_view data, std::size_t max_head, Head& out);

bool iequals(std::string_view a, std::string_view b) noexcept;

// True for fields that describe one connection rather than the message (RFC 9110 7.6.1),
// including those the message's Connection fields name (except the framing and Host).
bool is_hop_by_hop(std::string_view name, const std::vector<std::string_view>& connection_options) noexcept;

// More Connection options than any client or server needs: the message is refused rather than
// every field compared with each of them.
inline constexpr std::size_t kMaxConnectionOptions = 32;

// The decimal text of a number, for building heads without allocating.
struct Decimal {
  explicit Decimal(std::uint64_t v) noexcept;
  std::string_view view() const noexcept { return {buf + start, sizeof(buf) - start}; }
  char buf[20];
  std::size_t start;
};

// Follows a chunked body byte by byte through sizes, extensions and trailers, and jumps over
// chunk data, so a relay knows where the message ends without copying it. Optionally hands
// out the data bytes (for a request body, or a client that cannot read chunked).
class ChunkedDecoder {
 public:
  // A character of a field name (an RFC 9110 token).
  static constexpr bool is_name_char(char c) noexcept {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
  }
  struct Result {
    std::size_t consumed = 0;  // bytes of `in` that belong to this body
    bool done = false;
    bool bad = false;
  };
  // `on_data(std::string_view)` receives each piece of chunk data in order.
  template <typename OnData>
  Result feed(std::string_view in, OnData&& on_data);
  Result feed(std::string_view in) {
    return feed(in, [](std::string_view) {});
  }
  bool done() const noexcept { return state_ == State::kDone; }

 private:
  enum class State {
    kSize, kExtension, kSizeLf, kData, kDataCr, kDataLf, kTrailerStart, kTrailerLine,
    kTrailerLf, kFinalLf, kDone, kBad
  };
  State state_ = State::kSize;
  std::uint64_t remaining_ = 0;
  std::size_t digits_ = 0;  // of the current chunk-size, leading zeros included
  std::size_t extension_bytes_ = 0;
  std::size_t trailer_bytes_ = 0;
  bool trailer_colon_ = false;  // the current trailer line has its colon
};

template <typename OnData>
ChunkedDecoder::Result ChunkedDecoder::feed(std::string_view in, OnData&& on_data) {
  constexpr std::size_t kMaxTrailer = 64 * 1024;
  constexpr std::size_t kMaxExtension = 4 * 1024;  // per chunk
  std::size_t i = 0;
  while (i < in.size() && state_ != State::kDone && state_ != State::kBad) {
    const char c = in[i];
    switch (state_) {
      case State::kSize: {
        int v = -1;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
        if (v >= 0) {
          // chunk-size is 1*HEXDIG (RFC 9112 7.1): leading zeros may come in any number, so
          // the value is bounded (15 digits, 2^60 - 1, far beyond any body; more could
          // overflow), and the line like an extension, so that zeros cannot stream forever.
          if (remaining_ >= (std::uint64_t{1} << 56) || ++digits_ > kMaxExtension) {
            state_ = State::kBad;
            break;
          }
          remaining_ = remaining_ * 16 + static_cast<std::uint64_t>(v);
          ++i;
        } else if (digits_ > 0 && (c == ';' || c == ' ' || c == '\t')) {
          state_ = State::kExtension;
          ++i;
        } else if (digits_ > 0 && c == '\r') {
          state_ = State::kSizeLf;
          ++i;
        } else {
          state_ = State::kBad;
        }
        break;
      }
      case State::kExtension:
        if (c == '\r') state_ = State::kSizeLf;
        else if (c == '\n' || ++extension_bytes_ > kMaxExtension) state_ = State::kBad;
        ++i;
        break;
      case State::kSizeLf:
        if (c != '\n') { state_ = State::kBad; break; }
        ++i;
        digits_ = 0;
        extension_bytes_ = 0;
        state_ = remaining_ == 0 ? State::kTrailerStart : State::kData;
        break;
      case State::kData: {
        const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(remaining_, in.size() - i));
        on_data(in.substr(i, n));
        i += n;
        remaining_ -= n;
        if (remaining_ == 0) state_ = State::kDataCr;
        break;
      }
      case State::kDataCr:
        if (c != '\r') { state_ = State::kBad; break; }
        ++i;
        state_ = State::kDataLf;
        break;
      case State::kDataLf:
        if (c != '\n') { state_ = State::kBad; break; }
        ++i;
        state_ = State::kSize;
        break;
      case State::kTrailerStart:
        // A trailer field starts with its name, a token: anything else here (a bare LF, a
        // request line) would let what follows pass for trailer lines.
        if (c == '\r') {
          state_ = State::kFinalLf;
        } else if (!is_name_char(c)) {
          state_ = State::kBad;
          break;
        } else {
          state_ = State::kTrailerLine;
          trailer_colon_ = false;
        }
        ++i;
        if (++trailer_bytes_ > kMaxTrailer) state_ = State::kBad;
        break;
      case State::kTrailerLine:
        if (c == '\r') state_ = trailer_colon_ ? State::kTrailerLf : State::kBad;
        else if (c == '\n') state_ = State::kBad;
        else if (c == ':') trailer_colon_ = true;
        else if (!trailer_colon_ && !is_name_char(c)) state_ = State::kBad;  // the name is a token
        ++i;
        if (++trailer_bytes_ > kMaxTrailer) state_ = State::kBad;
        break;
      case State::kTrailerLf:
        if (c != '\n') { state_ = State::kBad; break; }
        ++i;
        state_ = State::kTrailerStart;
        break;
      case State::kFinalLf:
        if (c != '\n') { state_ = State::kBad; break; }
        ++i;
        state_ = State::kDone;
        break;
      case State::kDone:
      case State::kBad:
        break;
    }
  }
  return Result{i, state_ == State::kDone, state_ == State::kBad};
}

// Receives a body's content as BodyFramer::step reads it, without chunked framing (whatever the
// client gets): what a scanner of the content reads, as a chunk's size line may split a value.
struct BodyContentSink {
  void (*on_content)(void* context, std::string_view content) = nullptr;
  void* context = nullptr;
  void operator()(std::string_view content) const {
    if (on_content != nullptr && !content.empty()) on_content(context, content);
  }
};

// Where a response body ends, whatever its framing, and what the client gets of each piece:
// the bytes unchanged, or the data of a chunked body for a client that cannot read chunked.
class BodyFramer {
 public:
  enum class Kind { kNone, kLength, kChunked, kUntilClose };
  BodyFramer(Kind kind, std::uint64_t length, bool dechunk) : kind_(kind), remaining_(length), dechunk_(dechunk) {}

  struct Step {
    std::size_t consumed = 0;  // bytes of the input that belong to this body
    std::string_view payload;  // what the client gets for them (valid until the next step)
    bool last = false;         // the body is complete
    bool bad = false;          // broken chunked framing
  };
  using ContentSink = BodyContentSink;
  Step step(std::string_view data, ContentSink sink = {});
  // The connection closed: the end of a body framed by the close, an error for any other.
  void end_of_stream() noexcept { eof_ = true; }
  Kind kind() const noexcept { return kind_; }

 private:
  Kind kind_;
  std::uint64_t remaining_;
  bool dechunk_;
  bool eof_ = false;
  ChunkedDecoder decoder_;
  std::string decoded_;
};

// A read buffer: bytes arrive at the back and are consumed from the front; the unread part
// moves to the front only when room is needed. Grows on demand; never zero-fills.
class ByteBuffer {
 public:
  explicit ByteBuffer(std::size_t initial = 0) { if (initial) reallocate(initial); }
  std::string_view data() const noexcept { return {buf_.get() + begin_, end_ - begin_}; }
  std::size_t size() const noexcept { return end_ - begin_; }
  std::size_t capacity() const noexcept { return capacity_; }
  // Writable space of at least `min_free` bytes (and of at most what is there). When it grows,
  // the storage doubles, but not past `max_capacity` (unless min_free needs more).
  std::pair<char*, std::size_t> prepare(std::size_t min_free, std::size_t max_capacity = static_cast<std::size_t>(-1));
  // The capacity prepare(min_free, max_capacity) would leave (what a caller about to read holds).
  std::size_t capacity_for(std::size_t min_free, std::size_t max_capacity = static_cast<std::size_t>(-1)) const noexcept {
    if (capacity_ - size() >= min_free) return capacity_;
    return std::max(std::min(capacity_ * 2, max_capacity), size() + min_free);
  }
  void commit(std::size_t n) noexcept { end_ += n; }
  void consume(std::size_t n) noexcept {
    begin_ += n;
    if (begin_ >= end_) begin_ = end_ = 0;
  }
  void clear() noexcept { begin_ = end_ = 0; }
  // Removes `n` bytes at offset `pos` of data(), moving what follows down: bytes before `pos`
  // stay where they are (views into them stay valid).
  void erase(std::size_t pos, std::size_t n) noexcept {
    if (n == 0) return;
    std::memmove(buf_.get() + begin_ + pos, buf_.get() + begin_ + pos + n, size() - pos - n);
    end_ -= n;
  }
  // Frees the storage when empty (memory for idle connections), or resizes it.
  void release() noexcept {
    if (size() == 0) {
      buf_.reset();
      capacity_ = begin_ = end_ = 0;
    }
  }
  void reallocate(std::size_t capacity);

 private:
  std::unique_ptr<char[]> buf_;
  std::size_t capacity_ = 0;
  std::size_t begin_ = 0;
  std::size_t end_ = 0;
};

}  // namespace infergate::http1
