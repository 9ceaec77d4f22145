// SentencePiece .model files (Llama 2, Mistral, TinyLlama) through Debian's libsentencepiece.
#include <sentencepiece_processor.h>
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/utf8.h>

#include <cctype>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <unordered_set>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/formats/formats.h"
#include "lmforge/tokenizer/formats/sentencepiece_proto.h"

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
    // Unigram documents are encoded in chunks (see encode_append) where that gives the same ids:
    // a dummy prefix, and no piece with a ▁ after its start but whitespace-only ones (checked
    // below). A model lmforge's own parser refuses (one without a TrainerSpec) goes whole.
    try {
      const SentencePieceModel m = parse_sentencepiece_model(bytes, path);
      chunks_ = m.model_type == SentencePieceModel::kUnigram && m.add_dummy_prefix &&
                m.escape_whitespaces && !m.treat_whitespace_as_suffix;
    } catch (const Error&) {
      chunks_ = false;
    }
    const std::string_view space = "\xE2\x96\x81";
    fuses_unknown_ = true;
    for (int id = 0; id < sp_.GetPieceSize(); ++id) {
      fuses_unknown_ = fuses_unknown_ && !sp_.IsByte(id);
      const std::string p = sp_.IdToPiece(id);
      if (p.find_first_not_of(space) != std::string::npos && p.find(space, 1) != std::string::npos)
        chunks_ = false;
      for (size_t i = 0; i < p.size();) {
        const size_t n = std::max<size_t>(utf8_char_len(p, i), 1);
        piece_chars_.insert(char_key(std::string_view(p).substr(i, n)));
        i += n;
      }
    }
    space_id_ = sp_.PieceToId(std::string(space));
    kind_ = "sentencepiece";
    source_ = path;
    fingerprint_ = fnv1a_hex(bytes);
  }
  // SentencePiece never reads control symbols from text: allow_special has no effect.
  void encode_append(std::string_view text, std::vector<int32_t>& out, bool,
                     bool add_bos) const override {
    std::string shortened;
    const std::string_view t = shorten_unknown_runs(text, shortened);
    if (add_bos && bos_ >= 0) out.push_back(bos_);
    std::vector<int> ids;
    for (size_t start = 0;;) {
      const size_t end = chunk_end(t, start);
      auto st = sp_.Encode(t.substr(start, end - start), &ids);
      LMF_CHECK(st.ok(), "sentencepiece encode: {}", st.ToString());
      out.insert(out.end(), ids.begin(), ids.end());
      if (end == t.size()) break;
      start = end + 1;  // past the space, which the next chunk's dummy prefix stands for
    }
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
  // Where the chunk from `start` ends: at a space between two ASCII letters or digits, 8 KB or
  // more on (t.size() when none is, or when chunks_ is off). libsentencepiece 0.1.97's Unigram
  // Viterbi sums scores over the whole text in float: over documents of ~100 KB and more it
  // picks the other of two near-tied splits ("▁Ha r d" for "▁H ar d") where sentencepiece 0.2
  // does not. No piece spans "x▁y" (checked in the constructor), so the best split of the
  // whole is the chunks' best splits, each chunk's dummy prefix the ▁ of the space before it.
  size_t chunk_end(std::string_view t, size_t start) const {
    constexpr size_t kChunk = 8192;
    if (!chunks_ || t.size() - start <= kChunk) return t.size();
    auto alnum = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; };
    for (size_t i = start + kChunk; i + 1 < t.size(); ++i)
      if (t[i] == ' ' && alnum(t[i - 1]) && alnum(t[i + 1])) return i;
    return t.size();
  }

  static uint32_t char_key(std::string_view c) {  // a character's (1-4) bytes as one number
    uint32_t k = 0;
    std::memcpy(&k, c.data(), std::min<size_t>(c.size(), 4));
    return k;
  }

  // Whether `s` encodes alone as one <unk> (after the dummy prefix's ▁): every character of its
  // normalized form is one the model lacks.
  bool unknown_alone(std::string_view s) const {
    std::vector<int> ids;
    if (!sp_.Encode(s, &ids).ok()) return false;
    if (ids.size() == 2 && ids[0] == space_id_ && space_id_ != sp_.unk_id()) ids.erase(ids.begin());
    return ids.size() == 1 && ids[0] == sp_.unk_id();
  }

  // A character no piece contains and that normalizes to characters the model lacks, and which
  // composes with no neighbour (NFKC quick check "yes", combining class 0: not a combining mark
  // nor a Hangul vowel or final jamo, whose pairs may be pieces the characters alone are not).
  bool unknown_char(std::string_view c) const {
    const uint32_t key = char_key(c);
    if (static_cast<unsigned char>(c[0]) < 0x80 || piece_chars_.count(key)) return false;
    {
      std::shared_lock<std::shared_mutex> read(mu_);
      auto it = unknown_.find(key);
      if (it != unknown_.end()) return it->second;
    }
    int32_t i = 0;
    UChar32 cp = 0;
    U8_NEXT(c.data(), i, static_cast<int32_t>(c.size()), cp);
    const bool unknown = cp >= 0 &&
                         u_getIntPropertyValue(cp, UCHAR_NFKC_QUICK_CHECK) == UNORM_YES &&
                         u_getCombiningClass(cp) == 0 && unknown_alone(c);
    std::unique_lock<std::shared_mutex> write(mu_);
    unknown_.emplace(key, unknown);
    return unknown;
  }

  // libsentencepiece 0.1.97 (Debian 12's) takes time growing with the square of the length of a
  // run of characters the model lacks (5 MB of CJK in an English model: over 120 s, ~30 min by
  // the square;
  // sentencepiece 0.2 is linear). Without byte fallback such a run is one <unk> however long, so
  // each run over 64 characters is encoded as its first and last 32: the same ids.
  std::string_view shorten_unknown_runs(std::string_view text, std::string& out) const {
    if (!fuses_unknown_) return text;
    constexpr size_t kKeep = 32;
    size_t copied = 0, run_chars = 0, head_end = 0;
    auto end_run = [&](size_t end) {
      if (run_chars > 2 * kKeep) {
        size_t tail = end;
        for (size_t k = 0; k < kKeep; ++k) do
            --tail;
          while ((static_cast<unsigned char>(text[tail]) & 0xC0) == 0x80);
        size_t last_head = head_end;  // the junction's two characters must stay unknown together
        do --last_head;
        while ((static_cast<unsigned char>(text[last_head]) & 0xC0) == 0x80);
        std::string pair(text.substr(last_head, head_end - last_head));
        pair += text.substr(tail, utf8_char_len(text, tail));
        if (unknown_alone(pair)) {
          out.append(text.substr(copied, head_end - copied));
          copied = tail;
        }
      }
      run_chars = 0;
    };
    for (size_t i = 0; i < text.size();) {
      const size_t n = utf8_char_len(text, i);
      if (n > 0 && unknown_char(text.substr(i, n))) {
        if (++run_chars == kKeep) head_end = i + n;
      } else if (run_chars > 0) {
        end_run(i);
      }
      i += std::max<size_t>(n, 1);
    }
    if (run_chars > 0) end_run(text.size());
    if (copied == 0) return text;
    out.append(text.substr(copied));
    return out;
  }

  sentencepiece::SentencePieceProcessor sp_;
  bool fuses_unknown_ = false;  // no byte pieces: a run of characters it lacks is one <unk>
  bool chunks_ = false;         // a Unigram model whose documents encode in chunks (chunk_end)
  std::unordered_set<uint32_t> piece_chars_;  // the characters of its pieces
  int space_id_ = -1;                         // the piece "▁" (the dummy prefix)
  mutable std::shared_mutex mu_;
  mutable std::unordered_map<uint32_t, bool> unknown_;  // unknown_char's answers
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path) {
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace lmforge
