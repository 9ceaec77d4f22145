// Tokenizer: text <-> token ids, whatever the file format. Load one with load_tokenizer(), which
// detects the format from the path (docs/formats.md, "Tokenizers"):
//   *.tiktoken (+ a sibling .json with pat_str and special_tokens), Llama 3 tokenizer.model in
//   tiktoken format, Hugging Face tokenizer.json (byte-level BPE or SentencePiece-style BPE),
//   GPT-2 vocab.json + merges.txt, SentencePiece .model, "byte" (the byte-level tokenizer),
//   or a directory holding one of these.
//
//   auto tok = load_tokenizer("../shared/assets/tokenizers/cl100k_base.tiktoken");
//   std::vector<int32_t> ids = tok->encode("Hello world", /*allow_special=*/false);
//   std::string text = tok->decode(ids);
//   int32_t eot = tok->special_id("<|endoftext|>").value();
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lmforge {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // allow_special: special-token strings in `text` become their ids; otherwise they are plain
  // text. Post-processing (e.g. Llama 3's leading <|begin_of_text|>) is added only when
  // add_bos is true and the tokenizer defines one.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = false,
                              bool add_bos = false) const;
  // encode(), appending to `out` (a buffer reused across documents allocates nothing).
  virtual void encode_append(std::string_view text, std::vector<int32_t>& out,
                             bool allow_special = false, bool add_bos = false) const = 0;
  // A chat template's parts: text, or a special token by name.
  struct Segment {
    std::string_view text;
    bool special = false;
  };
  // Appends the ids of the segments' concatenation as encode(it, allow_special=true) would give
  // them if exactly the segments marked special were special tokens: text in the others stays
  // text even where it spells one (what a user typed), and the context crosses segments as it
  // does in one string (a Metaspace prefix with prepend_scheme "first" only at the very start; a
  // special's lstrip/rstrip takes the white space of the text beside it). ends (if given) gets
  // out.size() after each segment. Throws Error for a special the tokenizer does not have.
  virtual void encode_segments(const std::vector<Segment>& segments, std::vector<int32_t>& out,
                               std::vector<size_t>* ends = nullptr) const;
  // Encodes many documents on all cores (OpenMP); results in input order.
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string_view>& texts,
                                                 bool allow_special = false,
                                                 bool add_bos = false) const;
  // Ids of specials decode to their text. Invalid UTF-8 from partial sequences is kept as bytes.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // The raw bytes of one token (for streaming output); specials give their text.
  virtual std::string token_bytes(int32_t id) const = 0;

  // Number of ids (the largest id + 1), specials included.
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> special_id(std::string_view name) const;
  int32_t special_id_or_fail(std::string_view name) const;  // Error naming the tokenizer
  const std::map<std::string, int32_t>& special_tokens() const { return specials_; }
  // Beginning/end of a document (-1 when the tokenizer has none): the token `prepare` appends to
  // each document and `generate` stops at.
  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }

  // "tiktoken", "hf-bpe", "hf-sp-bpe", "gpt2-merges", "sentencepiece" or "byte".
  const std::string& kind() const { return kind_; }
  // Where it came from and a hash of its files' bytes (recorded in shards and checkpoints).
  const std::string& source() const { return source_; }
  const std::string& fingerprint() const { return fingerprint_; }

 protected:
  std::map<std::string, int32_t> specials_;
  int32_t bos_ = -1, eos_ = -1;
  std::string kind_, source_, fingerprint_;
};

// Throws Error naming the path and what was expected when nothing loadable is found.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

// Copies the tokenizer's files into `dir` under names load_tokenizer(dir) finds again
// (tokenizer.json, vocab.json + merges.txt, tokenizer.model, <name>.tiktoken + <name>.json).
// The byte-level tokenizer has no files: nothing is copied. Returns false in that case.
bool copy_tokenizer_files(const Tokenizer& tok, const std::string& dir);

// Writes the tokenizer in the Hugging Face layout into dir: tokenizer.json (+
// tokenizer_config.json, special_tokens_map.json as transformers expects) so
// AutoTokenizer.from_pretrained(dir) encodes like encode(). Its ids: add_special_tokens=False gives
// encode(text, allow_special=true)'s, split_special_tokens=True allow_special=false's,
// add_special_tokens=True adds add_bos's BOS. A tokenizer.json the tokenizer was loaded from is
// copied byte for byte, with the tokenizer_config.json beside it if any; the other kinds get one
// generated (tokenizer/hf_export.h, docs/formats.md "Export to Hugging Face"). Throws Error for a
// SentencePiece model that tokenizer.json cannot express exactly (Unigram, a precompiled charsmap
// such as nmt_nfkc, ...).
void export_hf_tokenizer(const Tokenizer& tok, const std::string& dir);

// Whether every id means the same token in a and b: the same fingerprint, or tokenizers of other
// formats with the same vocabulary (each id's bytes, the specials by name, BOS and EOS), such as a
// tiktoken file and the tokenizer.json lmforge exports from it. What a model trained on one's ids
// needs of the other (init_from with data.tokenizer, a distillation teacher).
bool same_vocabulary(const Tokenizer& a, const Tokenizer& b);

// FNV-1a 64-bit of data, as 16 hex digits (tokenizer fingerprints).
std::string fnv1a_hex(std::string_view data, uint64_t seed = 0xcbf29ce484222325ull);

}  // namespace lmforge
