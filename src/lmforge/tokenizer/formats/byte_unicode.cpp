// GPT-2's bytes_to_unicode (openai/gpt-2 src/encoder.py): printable bytes map to themselves,
// the other 68 to U+0100.. in byte order, so every byte is a visible character in vocab files.
#include <array>

#include "lmforge/core/error.h"
#include "lmforge/tokenizer/formats/formats.h"

namespace lmforge {

namespace {
struct ByteMap {
  std::array<uint32_t, 256> to_cp{};
  std::array<int, 324> from_cp{};  // code point -> byte, -1 if none
  ByteMap() {
    from_cp.fill(-1);
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      to_cp[b] = printable ? b : 256 + n++;
      from_cp[to_cp[b]] = b;
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace

int32_t checked_token_id(int64_t id, const std::string& where) {
  constexpr int64_t kMax = int64_t{1} << 22;
  if (id < 0 || id >= kMax)
    fail("{}: token id {} is outside [0, {}); the file is corrupt", where, id, kMax);
  return static_cast<int32_t>(id);
}

std::string gpt2_bytes_to_unicode(const std::string& bytes) {
  std::string s;
  for (unsigned char c : bytes) {
    uint32_t cp = byte_map().to_cp[c];
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return s;
}

bool gpt2_unicode_to_bytes(const std::string& mapped, std::string* bytes) {
  bytes->clear();
  for (size_t i = 0; i < mapped.size();) {
    unsigned char c = mapped[i];
    uint32_t cp;
    if (c < 0x80) {
      cp = c;
      i += 1;
    } else if ((c >> 5) == 0x6 && i + 1 < mapped.size()) {
      cp = ((c & 0x1F) << 6) | (static_cast<unsigned char>(mapped[i + 1]) & 0x3F);
      i += 2;
    } else {
      return false;  // code points beyond U+07FF are never in the map
    }
    if (cp >= byte_map().from_cp.size() || byte_map().from_cp[cp] < 0) return false;
    bytes->push_back(static_cast<char>(byte_map().from_cp[cp]));
  }
  return true;
}

}  // namespace lmforge
