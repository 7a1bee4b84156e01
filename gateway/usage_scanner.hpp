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
  void feed(std::string_view chunk) noexcept {
    if (chunk.find("_tokens\"") == std::string_view::npos) return;  // the common case: one scan
    scan(chunk, "\"prompt_tokens\"", prompt_);
    scan(chunk, "\"completion_tokens\"", completion_);
  }
  std::optional<std::uint64_t> prompt_tokens() const noexcept { return prompt_; }
  std::optional<std::uint64_t> completion_tokens() const noexcept { return completion_; }

 private:
  static void scan(std::string_view chunk, std::string_view key, std::optional<std::uint64_t>& out) noexcept {
    std::size_t pos = 0;
    while ((pos = chunk.find(key, pos)) != std::string_view::npos) {
      pos += key.size();
      std::size_t i = pos;
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
  }

  std::optional<std::uint64_t> prompt_;
  std::optional<std::uint64_t> completion_;
};

}  // namespace infergate::gateway
