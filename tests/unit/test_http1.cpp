#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "discovery/http1.hpp"

namespace {

using namespace infergate::http1;

TEST(Http1RequestTest, ParsesAPostWithItsFields) {
  Head h;
  const std::string data =
      "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
      "Content-Length: 17\r\nX-Request-ID:  abc \r\n\r\n{\"model\":\"m\"}xxx";
  ASSERT_EQ(parse_request(data, 8192, h), Parse::kComplete) << h.error;
  EXPECT_EQ(h.method, "POST");
  EXPECT_EQ(h.target, "/v1/chat/completions?x=1");
  EXPECT_EQ(h.version_minor, 1u);
  EXPECT_EQ(h.size, data.find("\r\n\r\n") + 4);
  ASSERT_TRUE(h.content_length.has_value());
  EXPECT_EQ(*h.content_length, 17u);
  EXPECT_EQ(h.find("x-request-id"), "abc");  // case-insensitive, whitespace trimmed
  EXPECT_EQ(h.find("HOST"), "gw");
  EXPECT_TRUE(h.find("missing").empty());
  EXPECT_EQ(h.fields.size(), 4u);
  EXPECT_TRUE(h.keep_alive());
  EXPECT_FALSE(h.chunked);
}

TEST(Http1RequestTest, KeepAliveFollowsTheVersionAndConnection) {
  Head h;
  ASSERT_EQ(parse_request("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_FALSE(h.keep_alive());
  ASSERT_EQ(parse_request("GET / HTTP/1.0\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_EQ(h.version_minor, 0u);
  EXPECT_FALSE(h.keep_alive());
  ASSERT_EQ(parse_request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_TRUE(h.keep_alive());
  // close wins over keep-alive, in either version (RFC 9112 9.3).
  ASSERT_EQ(parse_request("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_FALSE(h.keep_alive());
  ASSERT_EQ(parse_response("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", 8192, h),
            Parse::kComplete);
  EXPECT_FALSE(h.keep_alive());
  // HTTP/1.0 has no Transfer-Encoding: such a request's framing cannot be trusted (RFC 9112 6.1).
  EXPECT_EQ(parse_request("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 8192, h), Parse::kBad);
  EXPECT_EQ(h.error, "Transfer-Encoding in an HTTP/1.0 request");
  ASSERT_EQ(parse_request("GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_TRUE(h.keep_alive());
  EXPECT_TRUE(is_hop_by_hop("x-hop", h.connection_options));
  EXPECT_TRUE(is_hop_by_hop("Keep-Alive", h.connection_options));
  EXPECT_TRUE(is_hop_by_hop("Proxy-Authorization", {}));
  EXPECT_FALSE(is_hop_by_hop("Authorization", h.connection_options));
}

// A Connection field may withdraw fields from the next hop, but never the framing: a response
// without its Content-Length or Transfer-Encoding could not be read to its end.
TEST(Http1RequestTest, ConnectionOptionsNeverWithdrawTheFraming) {
  Head h;
  ASSERT_EQ(parse_response("HTTP/1.1 200 OK\r\nConnection: content-length, Transfer-Encoding, host, x-a\r\n"
                           "Connection: X-B\r\nContent-Length: 5\r\n\r\n",
                           8192, h),
            Parse::kComplete)
      << h.error;
  EXPECT_FALSE(is_hop_by_hop("Content-Length", h.connection_options));
  EXPECT_FALSE(is_hop_by_hop("transfer-encoding", h.connection_options));
  EXPECT_FALSE(is_hop_by_hop("Host", h.connection_options));
  EXPECT_TRUE(is_hop_by_hop("X-A", h.connection_options));
  EXPECT_TRUE(is_hop_by_hop("x-b", h.connection_options));  // every Connection field counts
  std::string many = "GET / HTTP/1.1\r\nHost: x\r\nConnection: a";
  for (std::size_t i = 0; i < kMaxConnectionOptions; ++i) many += ",a";
  EXPECT_EQ(parse_request(many + "\r\n\r\n", 1 << 20, h), Parse::kBad);
  EXPECT_EQ(h.error, "too many Connection options");
}

TEST(Http1RequestTest, IncompleteUntilTheBlankLineAndTooLargePastTheLimit) {
  Head h;
  EXPECT_EQ(parse_request("", 8192, h), Parse::kIncomplete);
  EXPECT_EQ(parse_request("GET / HTTP/1.1\r\nHost: x\r\n", 8192, h), Parse::kIncomplete);
  const std::string big = "GET / HTTP/1.1\r\nX-Big: " + std::string(200, 'a');
  EXPECT_EQ(parse_request(big, 100, h), Parse::kTooLarge);
  EXPECT_EQ(parse_request(big + "\r\n\r\n", 100, h), Parse::kTooLarge);  // complete, but over the limit
}

TEST(Http1RequestTest, SkipsStrayLineBreaksBetweenRequests) {
  Head h;
  const std::string data = "\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(parse_request(data, 8192, h), Parse::kComplete) << h.error;
  EXPECT_EQ(h.target, "/a");
  EXPECT_EQ(h.size, data.size());
}

TEST(Http1RequestTest, RejectsMalformedHeadsWithAReason) {
  const std::pair<const char*, const char*> cases[] = {
      {"GARBAGE\r\n\r\n", "malformed request line"},
      {"GET /\r\n\r\n", "malformed request line"},
      {"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"},
      {"G(T / HTTP/1.1\r\n\r\n", "invalid request method"},
      {"GET  HTTP/1.1\r\n\r\n", "empty request target"},
      // A fragment is the client's own (RFC 9112 3.2): never sent, so never forwarded.
      {"GET /v1/models#x HTTP/1.1\r\nHost: x\r\n\r\n", "fragment in the request target"},
      {"GET http://a/v1/models?q=1# HTTP/1.1\r\nHost: x\r\n\r\n", "fragment in the request target"},
      {"GET / HTTP/1.1\r\nHost x\r\n\r\n", "header field without a colon"},
      {"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", "invalid header field name"},
      {"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "invalid header field name"},
      {"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", "obsolete line folding in a header field"},
      {"GET / HTTP/1.1\r\nA: b\nB: c\r\n\r\n", "bad line ending in a header field"},
      {"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
       "both Content-Length and Transfer-Encoding"},
      {"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", "conflicting Content-Length fields"},
      {"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"},
      {"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", "invalid Content-Length"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"},
  };
  for (const auto& [input, why] : cases) {
    Head h;
    EXPECT_EQ(parse_request(input, 8192, h), Parse::kBad) << input;
    EXPECT_EQ(h.error, why) << input;
  }
}

TEST(Http1RequestTest, RepeatedEqualContentLengthsAndExpectAreUnderstood) {
  Head h;
  ASSERT_EQ(parse_request("PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\ncontent-length: 4\r\nExpect: 100-Continue\r\n\r\n",
                          8192, h),
            Parse::kComplete);
  EXPECT_EQ(*h.content_length, 4u);
  EXPECT_TRUE(h.expect_continue);
  ASSERT_EQ(parse_request("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_TRUE(h.chunked);
  ASSERT_EQ(parse_request("GET / HTTP/1.0\r\n\r\n", 8192, h), Parse::kComplete);  // 1.0 needs no Host
}

// The gateway re-frames a request body and forwards the fields: it refuses what it could not
// pass on faithfully or that a backend could read differently.
TEST(Http1RequestTest, RejectsWhatABackendCouldReadDifferently) {
  const std::pair<std::string, const char*> cases[] = {
      {"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported Transfer-Encoding"},
      {"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "unsupported Transfer-Encoding"},
      {"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
       "unsupported Transfer-Encoding"},
      {"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "missing Host field"},
      {"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host field"},
      {"GET / HTTP/1.1\r\nHost: x\r\nX-A: \x01\r\n\r\n", "invalid character in a header field value"},
      {"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7f\r\n\r\n", "invalid character in a header field value"},
      {"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", "invalid character in the request target"},
  };
  for (const auto& [input, why] : cases) {
    Head h;
    EXPECT_EQ(parse_request(input, 8192, h), Parse::kBad) << input;
    EXPECT_EQ(h.error, why) << input;
  }
  Head h;
  ASSERT_EQ(parse_request("GET / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xc3\xa9\t!\r\n\r\n", 8192, h), Parse::kComplete)
      << h.error;  // obs-text and tabs are allowed in values
}

// Input that cannot become a valid head is refused as soon as it arrives, not after
// timeouts.client_header: a TLS handshake, HTTP/0.9, bare-LF lines.
TEST(Http1RequestTest, HopelessInputIsRefusedBeforeTheHeadIsComplete) {
  const std::pair<std::string, const char*> cases[] = {
      {"\x16\x03\x01\x00\xc4\x01", "invalid request method"},
      {"GET /health\r\n", "malformed request line"},
      {"POST /echo HTTP/1.1\nHost: x\n", "bad line ending"},
      {"GET / HTTP/1.1\r\nHost: x\nAccept: y", "bad line ending"},
      {"GET / HTTP/2.0\r\nHost: x\r\n", "unsupported HTTP version"},
  };
  for (const auto& [input, why] : cases) {
    Head h;
    EXPECT_EQ(parse_request(input, 8192, h), Parse::kBad) << input;
    EXPECT_EQ(h.error, why) << input;
  }
  Head h;
  EXPECT_EQ(parse_request("POS", 8192, h), Parse::kIncomplete);
  EXPECT_EQ(parse_request("\r", 8192, h), Parse::kIncomplete);  // half of a stray CRLF between requests
  EXPECT_EQ(parse_request("POST /v1/completions HTTP/1.1\r\nHo", 8192, h), Parse::kIncomplete);
}

TEST(Http1ResponseTest, RejectsBareLfUnknownCodingsAndImpossibleStatus) {
  const std::pair<std::string, const char*> cases[] = {
      {"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "bad line ending"},
      {"HTTP/1.1 999 Odd\r\n\r\n", "malformed status code"},
      {"HTTP/1.1 200 OK\nSet-Cookie: a=b\r\nContent-Length: 0\r\n\r\n", "invalid character in the status line"},
      {"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\n", "unsupported Transfer-Encoding"},
  };
  for (const auto& [input, why] : cases) {
    Head h;
    EXPECT_EQ(parse_response(input, 8192, h), Parse::kBad) << input;
    EXPECT_EQ(h.error, why) << input;
  }
  Head h;
  ASSERT_EQ(parse_response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_TRUE(h.chunked);  // a backend may stack codings; the client gets them as they are
}

TEST(Http1ResponseTest, ParsesStatusReasonAndFraming) {
  Head h;
  ASSERT_EQ(parse_response("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                           "Content-Length: 10\r\n\r\n",
                           8192, h),
            Parse::kComplete)
      << h.error;
  EXPECT_EQ(h.status, 200u);
  EXPECT_EQ(h.reason, "OK");
  EXPECT_TRUE(h.chunked);
  EXPECT_FALSE(h.content_length.has_value());  // Transfer-Encoding overrides Content-Length
  ASSERT_EQ(parse_response("HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_EQ(h.status, 503u);
  EXPECT_TRUE(h.reason.empty());
  ASSERT_EQ(parse_response("HTTP/1.0 404 Not Found\r\n\r\n", 8192, h), Parse::kComplete);
  EXPECT_FALSE(h.keep_alive());
  EXPECT_EQ(parse_response("HTTP/1.1 20 OK\r\n\r\n", 8192, h), Parse::kBad);
  EXPECT_EQ(parse_response("HTTP/1.1 2000 OK\r\n\r\n", 8192, h), Parse::kBad);
  EXPECT_EQ(parse_response("SSH-2.0-OpenSSH\r\n\r\n", 8192, h), Parse::kBad);
}

TEST(Http1ChunkedTest, FindsTheEndAndTheDataWhateverTheSplit) {
  const std::string body = "5;ext=1\r\nhello\r\nB\r\n, world! :)\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
  const std::size_t end = body.find("NEXT");
  for (std::size_t step = 1; step <= body.size(); ++step) {
    ChunkedDecoder d;
    std::string data;
    std::size_t consumed = 0;
    bool done = false;
    for (std::size_t i = 0; i < body.size() && !done; i += step) {
      auto piece = std::string_view(body).substr(i, step);
      auto r = d.feed(piece, [&](std::string_view s) { data.append(s); });
      ASSERT_FALSE(r.bad) << "step " << step;
      consumed += r.consumed;
      done = r.done;
      if (!done) {
        EXPECT_EQ(r.consumed, piece.size());
      }
    }
    EXPECT_TRUE(done) << "step " << step;
    EXPECT_EQ(consumed, end) << "step " << step;  // stops before the next message
    EXPECT_EQ(data, "hello, world! :)") << "step " << step;
  }
}

// chunk-size is 1*HEXDIG (RFC 9112 7.1): leading zeros are allowed in any number, as nginx
// allows them; only the value is bounded.
TEST(Http1ChunkedTest, LeadingZerosInAChunkSizeAreNoOverflow) {
  const std::string body = "00000000000000000005\r\nhello\r\n" + std::string(40, '0') + "\r\n\r\nNEXT";
  for (std::size_t step = 1; step <= body.size(); ++step) {
    ChunkedDecoder d;
    std::string data;
    std::size_t consumed = 0;
    for (std::size_t i = 0; i < body.size() && !d.done(); i += step) {
      auto r = d.feed(std::string_view(body).substr(i, step), [&](std::string_view s) { data.append(s); });
      ASSERT_FALSE(r.bad) << "step " << step;
      consumed += r.consumed;
    }
    EXPECT_TRUE(d.done()) << "step " << step;
    EXPECT_EQ(consumed, body.find("NEXT")) << "step " << step;
    EXPECT_EQ(data, "hello") << "step " << step;
  }
  // The largest size (15 significant digits) still passes, zero-padded or not; one digit more
  // is refused however many zeros lead it.
  for (const std::string& size : {std::string("fffffffffffffff"), std::string("0000fffffffffffffff")}) {
    ChunkedDecoder d;
    auto r = d.feed(size + "\r\nabc");
    EXPECT_FALSE(r.bad) << size;
    EXPECT_EQ(r.consumed, size.size() + 5) << size;
  }
  for (const std::string& size : {std::string("1000000000000000"), std::string("00001000000000000000"),
                                  std::string("ffffffffffffffffffff")}) {
    ChunkedDecoder d;
    EXPECT_TRUE(d.feed(size + "\r\n").bad) << size;
  }
  // Zeros are not an endless line either: a size line is bounded like an extension.
  ChunkedDecoder endless;
  EXPECT_TRUE(endless.feed(std::string(5000, '0')).bad);
}

TEST(Http1ChunkedTest, RejectsBrokenFraming) {
  const std::string long_extension = "5;" + std::string(5000, 'x') + "\r\nhello\r\n";
  for (const std::string& input : {std::string("x\r\n"), std::string("5\r\nhelloXX"), std::string("5\nhello\r\n"),
                                  std::string("\r\n"), std::string("1234567890123456\r\n"), std::string("0\r\nTrailer\n"),
                                  // a bare LF after the last chunk, or a "trailer" without a colon,
                                  // would let a pipelined request pass for trailer lines
                                  std::string("5\r\nhello\r\n0\r\n\nGET /health HTTP/1.1\r\n\r\n"),
                                  std::string("0\r\nGET /health HTTP/1.1\r\n\r\n"), std::string("0\r\n: x\r\n\r\n"),
                                  std::string("0\r\nGET http://a/ HTTP/1.1\r\nHost: x\r\n\r\n"),
                                  long_extension}) {
    ChunkedDecoder d;
    EXPECT_TRUE(d.feed(input).bad) << input.substr(0, 60);
  }
  ChunkedDecoder empty;
  auto r = empty.feed("0\r\n\r\n");
  EXPECT_TRUE(r.done);
  EXPECT_EQ(r.consumed, 5u);
}

TEST(Http1BufferTest, EraseKeepsWhatComesBefore) {
  ByteBuffer b(16);
  auto [p, room] = b.prepare(12);
  std::memcpy(p, "HEADrawrawTAIL", 14);
  b.commit(14);
  const char* head = b.data().data();
  b.erase(4, 6);
  EXPECT_EQ(b.data(), "HEADTAIL");
  EXPECT_EQ(b.data().data(), head);
  b.erase(4, 0);
  EXPECT_EQ(b.data(), "HEADTAIL");
}

// capacity_for says what prepare will leave, so that memory can be counted before it is taken.
TEST(Http1BufferTest, CapacityForIsWhatPrepareLeaves) {
  ByteBuffer b;
  const std::pair<std::size_t, std::size_t> steps[] = {{100, 1000}, {50, 1000}, {300, 1000}, {900, 1000}, {10, 64}};
  for (const auto& [min_free, max_capacity] : steps) {
    const auto expected = b.capacity_for(min_free, max_capacity);
    auto [p, room] = b.prepare(min_free, max_capacity);
    EXPECT_EQ(b.capacity(), expected) << "prepare(" << min_free << ", " << max_capacity << ")";
    EXPECT_GE(room, min_free);
    std::memset(p, 'x', min_free / 2);
    b.commit(min_free / 2);
  }
  EXPECT_EQ(ByteBuffer(64).capacity_for(0), 64u);  // nothing needed: nothing grows
}

TEST(Http1BufferTest, GrowsCompactsAndReleases) {
  ByteBuffer b(8);
  auto [p, room] = b.prepare(4);
  EXPECT_GE(room, 4u);
  std::memcpy(p, "abcdefgh", 8);
  b.commit(8);
  EXPECT_EQ(b.data(), "abcdefgh");
  b.consume(6);
  EXPECT_EQ(b.data(), "gh");
  auto [p2, room2] = b.prepare(6);  // fits once the unread bytes move to the front
  EXPECT_EQ(b.capacity(), 8u);
  EXPECT_EQ(room2, 6u);
  std::memcpy(p2, "ijklmn", 6);
  b.commit(6);
  EXPECT_EQ(b.data(), "ghijklmn");
  auto [p3, room3] = b.prepare(100);  // grows, keeping the data
  EXPECT_GE(room3, 100u);
  (void)p3;
  EXPECT_EQ(b.data(), "ghijklmn");
  b.release();  // not empty: kept
  EXPECT_EQ(b.data(), "ghijklmn");
  b.consume(8);
  b.release();
  EXPECT_EQ(b.capacity(), 0u);
  EXPECT_EQ(b.size(), 0u);
}

TEST(Http1DecimalTest, PrintsNumbers) {
  EXPECT_EQ(Decimal(0).view(), "0");
  EXPECT_EQ(Decimal(200).view(), "200");
  EXPECT_EQ(Decimal(18446744073709551615ull).view(), "18446744073709551615");
}

}  // namespace
