// UTF-8 validity as Rust's str::from_utf8 judges it (Hugging Face and tiktoken take str): no
// overlong forms, no surrogates, nothing above U+10FFFF.
//
//   utf8_char_len("\xC3\xA9x", 0) == 2;  utf8_char_len("\xC0\x80", 0) == 0 (overlong)
//   find_invalid_utf8(text) == text.size()  // valid throughout
#pragma once

#include <cstddef>
#include <cstdint>
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

}  // namespace lmforge
