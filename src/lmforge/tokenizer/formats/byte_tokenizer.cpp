#include "lmforge/tokenizer/byte_level.h"
#include "lmforge/tokenizer/formats/formats.h"

namespace lmforge {

namespace {
// Adapts ByteTokenizer (ids 0..255 = bytes, 256 = <|endoftext|>) to the Tokenizer interface.
class ByteLevelTokenizer : public Tokenizer {
 public:
  ByteLevelTokenizer() {
    specials_["<|endoftext|>"] = ByteTokenizer::kEndOfText;
    eos_ = ByteTokenizer::kEndOfText;
    kind_ = "byte";
    source_ = "byte";
    fingerprint_ = "byte-v1";
  }
  std::vector<int32_t> encode(std::string_view text, bool allow_special, bool) const override {
    std::vector<int32_t> out;
    out.reserve(text.size());
    constexpr std::string_view kEot = "<|endoftext|>";
    for (size_t i = 0; i < text.size(); ++i) {
      if (allow_special && text.compare(i, kEot.size(), kEot) == 0) {
        out.push_back(ByteTokenizer::kEndOfText);
        i += kEot.size() - 1;
      } else {
        out.push_back(static_cast<unsigned char>(text[i]));
      }
    }
    return out;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids) s += token_bytes(id);
    return s;
  }
  std::string token_bytes(int32_t id) const override {
    if (id == ByteTokenizer::kEndOfText) return "<|endoftext|>";
    return ByteTokenizer().decode_one(id);
  }
  int64_t vocab_size() const override { return ByteTokenizer::kVocabSize; }
};
}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteLevelTokenizer>(); }

}  // namespace lmforge
