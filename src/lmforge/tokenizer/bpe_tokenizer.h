// BpeTokenizer: the BPE tokenizer that the tiktoken, Hugging Face tokenizer.json and GPT-2
// vocab.json+merges.txt loaders fill in (tokenizer/formats/*.cpp). Encoding:
//   1. split out special tokens (when allowed),
//   2. normalize (a Unicode normal form, e.g. Qwen2's NFC; SentencePiece-style: spaces -> "▁",
//      optional leading "▁"),
//   3. pre-tokenize with the regex (if any),
//   4. per piece: the whole piece if it is a token and whole-piece lookup is on (tiktoken,
//      HF ignore_merges), else initial symbols (bytes, or characters with byte fallback) merged
//      by the BpeEngine. Pieces are cached.
#pragma once

#include <array>
#include <memory>
#include <unordered_map>

#include "lmforge/tokenizer/bpe.h"
#include "lmforge/tokenizer/pretokenizer.h"
#include "lmforge/tokenizer/string_id_map.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/tokenizer/unicode_normalize.h"

namespace lmforge {

class BpeTokenizer : public Tokenizer {
 public:
  enum class Symbols { kBytes, kCharsWithByteFallback };
  // SentencePiece-style leading "▁" on each run of text between special tokens (Hugging Face
  // normalizes and pre-tokenizes each run on its own):
  //   kNever;
  //   kFirst:  the run at the start of the text, unless it starts with "▁" already (HF Metaspace
  //            prepend_scheme "first");
  //   kAlways: every run that does not start with "▁" already (Metaspace "always");
  //   kEvery:  every run, unconditionally (HF's Prepend("▁") normalizer, as in Llama 2's export).
  enum class Prepend { kNever, kFirst, kAlways, kEvery };

  void encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special = false,
                     bool add_bos = false) const override;
  void encode_segments(const std::vector<Segment>& segments, std::vector<int32_t>& out,
                       std::vector<size_t>* ends = nullptr) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string token_bytes(int32_t id) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(vocab_.size()); }

  // --- filled in by the format loaders ---
  // Registers token `id` with raw bytes `bytes` (ids may have gaps; missing ids decode to "").
  void add_token(int32_t id, std::string bytes);
  // Hugging Face added-token flags (tokenizer.json's added_tokens): a kNotSpecial token
  // ("special": false, e.g. Qwen3's <think>) is matched in text even without allow_special, as
  // Hugging Face matches it even with split_special_tokens; kLstrip / kRstrip take the
  // whitespace before / after the token into it.
  enum AddedFlags : uint8_t { kNotSpecial = 1, kLstrip = 2, kRstrip = 4 };
  void add_special(const std::string& text, int32_t id, uint8_t flags = 0);
  int32_t id_of(std::string_view bytes) const;  // -1 if not a token
  BpeEngine& engine() { return engine_; }
  void set_pretokenizer(std::unique_ptr<Pretokenizer> p) { pre_ = std::move(p); }
  // Hugging Face's Digits pre-tokenizer before the regex (SmolLM, StarCoder): numeric characters
  // split off first, one piece each (individual) or per run; the regex then splits the rest.
  void set_digits(bool individual);
  void set_symbols(Symbols s) { symbols_ = s; }
  void set_whole_piece_lookup(bool on) { whole_piece_ = on; }
  // SentencePiece-style: replace ' ' with "▁" (U+2581) and prepend one per the scheme; decode
  // reverses both. unk is used for characters without a token when byte fallback is off.
  void set_metaspace(bool on, Prepend prepend) {
    metaspace_ = on;
    prepend_ = prepend;
  }
  void set_byte_fallback(bool on) { byte_fallback_ = on; }
  // Hugging Face's NFC / NFD / NFKC / NFKD normalizer: each run of text between special tokens
  // is put in that form first (before the "▁" and prefix-space steps).
  void set_normal_form(NormalForm f) { normal_form_ = f; }
  NormalForm normal_form() const { return normal_form_; }
  // unk for each character without a token (and, with byte fallback, without every one of its
  // <0xXX> tokens); fused: one unk for a run of such characters within a piece (HF fuse_unk).
  // Without an unk token such characters are dropped, as Hugging Face drops them.
  void set_unk(int32_t id, bool fused = false) {
    unk_ = id;
    fuse_unk_ = fused;
  }
  // HF ByteLevel add_prefix_space: a space before each run of text between special tokens that
  // does not start with one.
  void set_add_prefix_space(bool on) { add_prefix_space_ = on; }
  void set_bos_eos(int32_t bos, int32_t eos) {
    bos_ = bos;
    eos_ = eos;
  }
  void set_identity(std::string kind, std::string source, std::string fingerprint) {
    kind_ = std::move(kind);
    source_ = std::move(source);
    fingerprint_ = std::move(fingerprint);
  }
  // Call once after loading: builds the byte tables and the special-token matcher.
  void finalize();

  // --- read back by the Hugging Face export (tokenizer/hf_export.cpp) ---
  const BpeEngine& engine() const { return engine_; }
  const Pretokenizer* pretokenizer() const { return pre_.get(); }
  Symbols symbols() const { return symbols_; }
  bool whole_piece_lookup() const { return whole_piece_; }
  bool metaspace() const { return metaspace_; }
  bool add_prefix_space() const { return add_prefix_space_; }
  int32_t unk() const { return unk_; }

 private:
  void encode_ordinary(std::string_view text, bool at_start, std::vector<int32_t>& out) const;
  // encode_append's text, at the start of the whole text or not (a Metaspace "first" prefix).
  void encode_run(std::string_view text, bool at_start, bool allow_special,
                  std::vector<int32_t>& out) const;
  uint8_t added_flags(std::string_view text) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

  std::vector<std::string> vocab_;  // id -> raw bytes
  StringIdMap ids_;
  std::vector<bool> is_special_;
  BpeEngine engine_;
  std::unique_ptr<Pretokenizer> pre_, digits_;
  Symbols symbols_ = Symbols::kBytes;
  bool whole_piece_ = false, metaspace_ = false, byte_fallback_ = false, add_prefix_space_ = false;
  bool fuse_unk_ = false;
  std::unordered_map<std::string, uint8_t> added_flags_;  // non-zero AddedFlags by text
  bool has_not_special_ = false;                          // any kNotSpecial token
  Prepend prepend_ = Prepend::kNever;
  NormalForm normal_form_ = NormalForm::kNone;
  int32_t unk_ = -1;
  std::array<int32_t, 256> byte_id_{};      // kBytes: the token of each single byte
  std::array<int32_t, 256> fallback_id_{};  // byte fallback: the id of "<0xXX>"
  std::array<std::vector<std::string>, 256> specials_by_first_;  // longest first
  // Pieces repeat (words), so their ids are cached: per thread (no locks in encode_batch),
  // bounded, keyed by this tokenizer's serial number (never reused, unlike its address).
  using PieceCache = std::unordered_map<std::string, std::vector<int32_t>>;
  PieceCache& cache() const;
  uint64_t serial_;

 public:
  BpeTokenizer();
};

}  // namespace lmforge
