// How deep JSON text nests, checked on the text before it is parsed: the JSON library writes
// nested values back out recursively, and 100,000 levels overflow the stack. Text from clients
// and from backends alike is checked before anything of it is written out again.
#pragma once

#include <cstddef>
#include <string_view>

namespace infergate {

// JSON nested deeper than this is refused (from clients) or not taken as JSON (from backends).
inline constexpr int kMaxJsonDepth = 64;

// Whether no array or object in `text` nests deeper than `max_depth` (strings are skipped; the
// text need not be valid JSON).
inline bool json_depth_within(std::string_view text, int max_depth = kMaxJsonDepth) noexcept {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > max_depth) return false;
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  return true;
}

}  // namespace infergate
