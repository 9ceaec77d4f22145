// SentencePiece .model files (Llama 2, Mistral, TinyLlama) through Debian's libsentencepiece.
#include <sentencepiece_processor.h>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/formats/formats.h"

namespace lmforge {

namespace {

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path) {
    std::string bytes = read_file(path);
    auto st = sp_.LoadFromSerializedProto(bytes);
    if (!st.ok()) fail("{}: not a SentencePiece model ({}); check the file", path, st.ToString());
    for (int id = 0; id < sp_.GetPieceSize(); ++id)
      if (sp_.IsControl(id) || sp_.IsUnknown(id)) specials_[sp_.IdToPiece(id)] = id;
    bos_ = sp_.bos_id();
    eos_ = sp_.eos_id();
    kind_ = "sentencepiece";
    source_ = path;
    fingerprint_ = fnv1a_hex(bytes);
  }
  // SentencePiece never reads control symbols from text: allow_special has no effect.
  void encode_append(std::string_view text, std::vector<int32_t>& out, bool,
                     bool add_bos) const override {
    std::vector<int> ids;
    auto st = sp_.Encode(text, &ids);
    LMF_CHECK(st.ok(), "sentencepiece encode: {}", st.ToString());
    if (add_bos && bos_ >= 0) out.push_back(bos_);
    out.insert(out.end(), ids.begin(), ids.end());
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    std::vector<int> v(ids.begin(), ids.end());
    for (int& id : v)
      if (id < 0 || id >= sp_.GetPieceSize()) id = sp_.unk_id();
    auto st = sp_.Decode(v, &s);
    LMF_CHECK(st.ok(), "sentencepiece decode: {}", st.ToString());
    return s;
  }
  std::string token_bytes(int32_t id) const override {
    if (id < 0 || id >= sp_.GetPieceSize()) return "";
    std::string p = sp_.IdToPiece(id);
    if (sp_.IsByte(id))
      return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
    if (sp_.IsControl(id)) return "";
    std::string s;
    for (size_t i = 0; i < p.size();) {
      if (p.compare(i, 3, "\xE2\x96\x81") == 0) {
        s += ' ';
        i += 3;
      } else {
        s += p[i++];
      }
    }
    return s;
  }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path) {
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace lmforge
