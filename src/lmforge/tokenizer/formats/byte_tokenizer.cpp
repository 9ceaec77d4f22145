// The byte-level tokenizer ("byte"): ids 0..255 are bytes, 256 is <|endoftext|>. Lossless for
// any bytes; the demo's first tokenizer and a baseline.
#include "lmforge/tokenizer/formats/formats.h"

namespace lmforge {

namespace {

constexpr int32_t kEndOfText = 256;
constexpr std::string_view kEndOfTextText = "<|endoftext|>";

class ByteLevelTokenizer : public Tokenizer {
 public:
  ByteLevelTokenizer() {
    specials_[std::string(kEndOfTextText)] = kEndOfText;
    eos_ = kEndOfText;
    kind_ = "byte";
    source_ = "byte";
    fingerprint_ = "byte-v1";
  }
  void encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special,
                     bool) const override {
    for (size_t i = 0; i < text.size(); ++i) {
      if (allow_special && text.compare(i, kEndOfTextText.size(), kEndOfTextText) == 0) {
        out.push_back(kEndOfText);
        i += kEndOfTextText.size() - 1;
      } else {
        out.push_back(static_cast<unsigned char>(text[i]));
      }
    }
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids) s += token_bytes(id);
    return s;
  }
  std::string token_bytes(int32_t id) const override {
    if (id == kEndOfText) return std::string(kEndOfTextText);
    return id >= 0 && id < 256 ? std::string(1, static_cast<char>(id)) : std::string();
  }
  int64_t vocab_size() const override { return 257; }
};

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteLevelTokenizer>(); }

}  // namespace lmforge
