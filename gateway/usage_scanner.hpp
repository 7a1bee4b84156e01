// Finds the token counts an OpenAI-style response reports in "usage", without parsing the JSON:
// the relay sees the body in pieces and must not slow down for it. The last values seen win
// (streams with continuous usage repeat running totals).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace infergate::gateway {

class UsageScanner {
 public:
  // One search per piece, for the suffix both keys share; what precedes it tells them apart.
  void feed(std::string_view chunk) noexcept {
    static constexpr std::string_view kSuffix = "_tokens\"";
    for (auto pos = chunk.find(kSuffix); pos != std::string_view::npos; pos = chunk.find(kSuffix, pos + 1)) {
      const auto before = chunk.substr(0, pos);
      if (before.ends_with("\"prompt")) {
        read_value(chunk, pos + kSuffix.size(), prompt_);
      } else if (before.ends_with("\"completion")) {
        read_value(chunk, pos + kSuffix.size(), completion_);
      }
    }
  }
  std::optional<std::uint64_t> prompt_tokens() const noexcept { return prompt_; }
  std::optional<std::uint64_t> completion_tokens() const noexcept { return completion_; }

 private:
  static void read_value(std::string_view chunk, std::size_t i, std::optional<std::uint64_t>& out) noexcept {
    while (i < chunk.size() && (chunk[i] == ' ' || chunk[i] == ':')) ++i;
    std::uint64_t value = 0;
    std::size_t digits = 0;
    while (i < chunk.size() && chunk[i] >= '0' && chunk[i] <= '9' && digits < 18) {
      value = value * 10 + static_cast<std::uint64_t>(chunk[i] - '0');
      ++i;
      ++digits;
    }
    if (digits > 0) out = value;
  }

  std::optional<std::uint64_t> prompt_;
  std::optional<std::uint64_t> completion_;
};

}  // namespace infergate::gateway
