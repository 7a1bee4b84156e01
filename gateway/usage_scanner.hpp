// Finds the token counts an OpenAI-style response reports in "usage", without parsing the JSON:
// the relay sees the body in pieces and must not slow down for it. The last values seen win
// (streams with continuous usage repeat running totals).
//
// A key or its number may be split between two pieces (a backlogged stream is read in whatever
// sizes the socket gives). The scanner keeps the last kCarry bytes it saw and, on the next piece,
// scans them joined to that piece's start before the piece itself, so a split "usage" is read
// whole: the joined scan re-reads the value the earlier piece cut short.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace infergate::gateway {

class UsageScanner {
 public:
  void feed(std::string_view chunk) noexcept {
    if (carry_size_ > 0) {
      const auto head = chunk.substr(0, std::min(chunk.size(), kCarry));
      std::array<char, 2 * kCarry> joined;
      std::memcpy(joined.data(), carry_.data(), carry_size_);
      std::memcpy(joined.data() + carry_size_, head.data(), head.size());
      scan({joined.data(), carry_size_ + head.size()});
    }
    scan(chunk);
    keep_tail(chunk);
  }
  std::optional<std::uint64_t> prompt_tokens() const noexcept { return prompt_; }
  std::optional<std::uint64_t> completion_tokens() const noexcept { return completion_; }

 private:
  // Enough for `"completion_tokens"`, any spacing a server uses and an 18-digit number.
  static constexpr std::size_t kCarry = 64;

  // One search per piece, for the suffix both keys share; what precedes it tells them apart.
  void scan(std::string_view text) noexcept {
    static constexpr std::string_view kSuffix = "_tokens\"";
    for (auto pos = text.find(kSuffix); pos != std::string_view::npos; pos = text.find(kSuffix, pos + 1)) {
      const auto before = text.substr(0, pos);
      if (before.ends_with("\"prompt")) {
        read_value(text, pos + kSuffix.size(), prompt_);
      } else if (before.ends_with("\"completion")) {
        read_value(text, pos + kSuffix.size(), completion_);
      }
    }
  }

  void keep_tail(std::string_view chunk) noexcept {
    if (chunk.size() >= kCarry) {
      std::memcpy(carry_.data(), chunk.data() + chunk.size() - kCarry, kCarry);
      carry_size_ = kCarry;
      return;
    }
    const auto keep = std::min(carry_size_, kCarry - chunk.size());  // older bytes still in the window
    std::memmove(carry_.data(), carry_.data() + carry_size_ - keep, keep);
    std::memcpy(carry_.data() + keep, chunk.data(), chunk.size());
    carry_size_ = keep + chunk.size();
  }

  static bool is_space(char c) noexcept { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

  static void read_value(std::string_view text, std::size_t i, std::optional<std::uint64_t>& out) noexcept {
    while (i < text.size() && (is_space(text[i]) || text[i] == ':')) ++i;
    std::uint64_t value = 0;
    std::size_t digits = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9' && digits < 18) {
      value = value * 10 + static_cast<std::uint64_t>(text[i] - '0');
      ++i;
      ++digits;
    }
    if (digits > 0) out = value;
  }

  std::optional<std::uint64_t> prompt_;
  std::optional<std::uint64_t> completion_;
  std::array<char, kCarry> carry_{};
  std::size_t carry_size_ = 0;
};

}  // namespace infergate::gateway
