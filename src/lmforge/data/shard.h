// Token shards: lmforge's on-disk token format (docs/formats.md).
//   bytes 0..7    magic "LMFSHARD"
//   bytes 8..11   u32 version (3 with a loss mask, else 2; version 1 files, without the fields
//                 below, are still read)
//   bytes 12..15  u32 bytes per token: 2 (u16) or 4 (u32)
//   bytes 16..23  u64 token count N
//   bytes 24..31  u64 document count D (0 = no document index)
//   bytes 32..39  u64 tokenizer vocabulary size
//   bytes 40..47  i32 BOS id, i32 EOS id (-1 = none)
//   bytes 48..63  tokenizer fingerprint, 16 ASCII hex digits
//   bytes 64..79  tokenizer kind, ASCII, NUL-padded
//   bytes 80..83  u32 flags (version 3): bit 0 = a loss mask follows the index; bit 1 =
//                 preference pairs (with bit 0): documents 2j and 2j+1 are pair j's chosen and
//                 rejected responses with their prompt, the mask marking the responses; bit 2
//                 = labelled responses (with bit 0 and an index, not bit 1): each document a
//                 prompt and response, D label bytes after the mask (1 = desirable, 0 = not)
//   bytes 84..255 reserved, zero
//   bytes 256..   N tokens, little-endian; then, when D > 0, D+1 u64 document start offsets;
//                 then, with a loss mask, ceil(N/8) bytes: bit i % 8 of byte i / 8 set when token
//                 i is a target (SFT's assistant-only loss; without a mask every token is)
// Readers map the file and check magic, version, dtype and that the size equals the header's.
//
//   write_shard(path, tokens);              // atomic: tmp + rename
//   TokenShard s = TokenShard::open(path);  // s.size(), s[i], s.num_docs(), s.doc_start(d)
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace lmforge {

class AtomicFile;

constexpr char kShardMagic[8] = {'L', 'M', 'F', 'S', 'H', 'A', 'R', 'D'};
constexpr uint32_t kShardVersion = 2;
constexpr uint32_t kShardVersionMasked = 3;  // with a loss mask

// Who made the tokens (from the Tokenizer; all empty/-1 for version-1 shards).
struct ShardTokenizerInfo {
  std::string fingerprint;  // 16 hex digits
  std::string kind;         // e.g. "tiktoken"
  uint64_t vocab_size = 0;
  int32_t bos = -1, eos = -1;
};
constexpr size_t kShardHeaderBytes = 256;

class TokenShard {
 public:
  static TokenShard open(const std::string& path);
  int64_t size() const { return n_; }
  uint32_t operator[](int64_t i) const { return u16_ ? u16_[i] : u32_[i]; }
  uint32_t max_token() const;
  uint32_t version() const { return version_; }
  const ShardTokenizerInfo& tokenizer() const { return tok_; }
  // Document index (empty when the shard has none): document d is [doc_start(d), doc_start(d+1)).
  int64_t num_docs() const { return static_cast<int64_t>(docs_n_); }
  int64_t doc_start(int64_t d) const {  // the index follows 2-byte tokens: maybe not 8-aligned
    uint64_t v;
    std::memcpy(&v, docs_ + 8 * d, 8);
    return static_cast<int64_t>(v);
  }
  // Loss mask: whether token i may be a target (the loader ignores targets it clears).
  bool has_loss_mask() const { return mask_ != nullptr; }
  bool is_target(int64_t i) const { return !mask_ || (mask_[i >> 3] >> (i & 7)) & 1; }
  // Preference pairs (prepare --format preference): documents 2j, 2j+1 are chosen, rejected.
  bool paired() const { return paired_; }
  // Labelled responses (prepare --format unpaired): document d is desirable when label(d) is 1.
  bool labelled() const { return labels_ != nullptr; }
  int8_t label(int64_t d) const { return static_cast<int8_t>(labels_[d]); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::shared_ptr<void> map_;
  const uint16_t* u16_ = nullptr;
  const uint32_t* u32_ = nullptr;
  int64_t n_ = 0;
  uint32_t version_ = 0;
  ShardTokenizerInfo tok_;
  const char* docs_ = nullptr;  // D+1 little-endian u64
  uint64_t docs_n_ = 0;
  const uint8_t* mask_ = nullptr;    // ceil(N/8) bytes, or null
  const uint8_t* labels_ = nullptr;  // D bytes, or null
  bool paired_ = false;
};

// Streams one shard to disk: tokens go to the file as they are appended (converted to the
// shard's width through a small staging buffer), document starts are kept (8 bytes each), and
// commit() appends the index, fills in the header's counts and renames the file into place
// (AtomicFile: destroyed without commit(), nothing is left). Memory grows with the shard only by
// the index (8 bytes per document) and, for a loss mask, one bit per token.
//
//   ShardWriter w(path, info, ShardWriter::width_for(info.vocab_size));
//   w.begin_document(); w.append(ids.data(), ids.size()); ... w.commit();
class ShardWriter {
 public:
  // loss_mask: the shard carries a loss mask (version 3); append() without one marks its tokens
  // as targets. paired: preference pairs (a loss mask too; an even number of documents).
  // labelled: labelled responses (a loss mask too; begin_document gives each its label).
  ShardWriter(const std::string& path, const ShardTokenizerInfo& tok, uint32_t width,
              bool loss_mask = false, bool paired = false, bool labelled = false);
  ~ShardWriter();
  // 2 (u16) when every id of a vocabulary of this size fits, else 4.
  static uint32_t width_for(uint64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

  void begin_document() { starts_.push_back(count_); }
  void begin_document(bool desirable) {  // labelled shards
    starts_.push_back(count_);
    labels_.push_back(desirable ? 1 : 0);
  }
  void append(const int32_t* ids, size_t n, const uint8_t* is_target = nullptr);
  void append(int32_t id) { append(&id, 1); }
  uint64_t tokens() const { return count_; }
  uint64_t documents() const { return starts_.size(); }
  void commit();

 private:
  void flush();

  std::unique_ptr<AtomicFile> file_;
  std::string path_;
  ShardTokenizerInfo tok_;
  uint32_t width_;
  uint64_t count_ = 0;
  std::vector<uint64_t> starts_;
  bool masked_ = false, paired_ = false, labelled_ = false;
  std::vector<uint8_t> mask_;    // ceil(count_/8) bytes when masked_
  std::vector<uint8_t> labels_;  // one per document when labelled_
  std::vector<uint8_t> stage_;
  size_t staged_ = 0;  // bytes in stage_
};

// Writes a whole shard at once: u16 tokens when every id < 65536, else u32. doc_starts
// (optional): the start offset of each document, ascending from 0; the end offset N is added.
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_starts = {}, const ShardTokenizerInfo& tok = {});

// Expands a path, a directory or a glob into sorted shard paths; throws Error naming `key` when
// nothing matches. In a directory from `prepare`, a key ending in ".val" takes val-*.bin and
// any other key train-*.bin (all *.bin when there are no such names).
std::vector<std::string> expand_shards(const std::string& spec, const std::string& key);

}  // namespace lmforge
