// The byte-level tokenizer: ids 0..255 are bytes, 256 is <|endoftext|>. Used by the demo until
// a BPE tokenizer (the tokenizer issue) replaces it. Lossless for any byte string.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lmforge {

class ByteTokenizer {
 public:
  static constexpr int32_t kEndOfText = 256;
  static constexpr int64_t kVocabSize = 257;
  std::vector<int32_t> encode(std::string_view text) const;
  // Ids past the byte range (the end-of-text token) decode to "".
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string decode_one(int32_t id) const;
};

}  // namespace lmforge
