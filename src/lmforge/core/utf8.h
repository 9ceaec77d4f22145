// UTF-8 validity as Rust's str::from_utf8 judges it (Hugging Face and tiktoken take str): no
// overlong forms, no surrogates, nothing above U+10FFFF.
//
//   utf8_char_len("\xC3\xA9x", 0) == 2;  utf8_char_len("\xC0\x80", 0) == 0 (overlong)
//   find_invalid_utf8(text) == text.size()  // valid throughout
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace lmforge {

// The length of the valid character starting at s[i] (1-4), or 0 when none starts there.
inline size_t utf8_char_len(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t len;
  uint32_t cp, min;
  if ((c & 0xE0) == 0xC0)
    len = 2, cp = c & 0x1F, min = 0x80;
  else if ((c & 0xF0) == 0xE0)
    len = 3, cp = c & 0x0F, min = 0x800;
  else if ((c & 0xF8) == 0xF0)
    len = 4, cp = c & 0x07, min = 0x10000;
  else
    return 0;
  if (s.size() - i < len) return 0;
  for (size_t k = 1; k < len; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

// Where the first byte that is not valid UTF-8 is, or s.size() when all are.
inline size_t find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const size_t n = utf8_char_len(s, i);
    if (n == 0) return i;
    i += n;
  }
  return s.size();
}

// Text streamed a piece at a time (a token's bytes), printed as valid UTF-8: a character cut at
// the end of a piece waits for the next; bytes that begin no character, and a character the
// stream ends inside (finish), print as U+FFFD, one per maximal invalid part, as transformers'
// TextStreamer shows them (its decode with errors="replace").
//
//   Utf8Stream u;  print(u.push(token_bytes));  ...  print(u.finish());
class Utf8Stream {
 public:
  std::string push(std::string_view bytes) {
    pending_.append(bytes);
    std::string out;
    size_t i = 0;
    while (i < pending_.size()) {
      if (const size_t n = utf8_char_len(pending_, i)) {
        out.append(pending_, i, n);
        i += n;
        continue;
      }
      const size_t part = valid_prefix(std::string_view(pending_).substr(i));
      if (part > 0 && i + part == pending_.size()) break;  // the rest may still come
      out += kReplacement;
      i += part > 0 ? part : 1;
    }
    pending_.erase(0, i);
    return out;
  }
  std::string finish() {
    std::string out = pending_.empty() ? "" : kReplacement;
    pending_.clear();
    return out;
  }

 private:
  static constexpr const char* kReplacement = "\xEF\xBF\xBD";
  // The bytes of s (fewer than a whole character) that begin some valid character: all of them
  // when completing them with continuation bytes can make one, else 0.
  static size_t valid_prefix(std::string_view s) {
    for (size_t n = std::min<size_t>(s.size(), 3); n > 0; --n)
      for (const char* fill : {"\x80\x80\x80", "\xBF\xBF\xBF"}) {
        const std::string t = std::string(s.substr(0, n)) + fill;
        if (utf8_char_len(t, 0) > n) return n;
      }
    return 0;
  }
  std::string pending_;
};

}  // namespace lmforge
