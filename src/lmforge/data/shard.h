// Token shards: lmforge's on-disk token format (docs/formats.md).
//   bytes 0..7    magic "LMFSHARD"
//   bytes 8..11   u32 version (1)
//   bytes 12..15  u32 bytes per token: 2 (u16) or 4 (u32)
//   bytes 16..23  u64 token count
//   bytes 24..255 reserved, zero (the data-pipeline issue adds document and tokenizer fields)
//   bytes 256..   tokens, little-endian
// Readers map the file and check magic, version, dtype and that the size equals the header's.
//
//   write_shard(path, tokens);              // atomic: tmp + rename
//   TokenShard s = TokenShard::open(path);  // s.size(), s[i]
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lmforge {

constexpr char kShardMagic[8] = {'L', 'M', 'F', 'S', 'H', 'A', 'R', 'D'};
constexpr uint32_t kShardVersion = 1;
constexpr size_t kShardHeaderBytes = 256;

class TokenShard {
 public:
  static TokenShard open(const std::string& path);
  int64_t size() const { return n_; }
  uint32_t operator[](int64_t i) const { return u16_ ? u16_[i] : u32_[i]; }
  uint32_t max_token() const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::shared_ptr<void> map_;
  const uint16_t* u16_ = nullptr;
  const uint32_t* u32_ = nullptr;
  int64_t n_ = 0;
};

// Writes u16 tokens when every id < 65536, else u32.
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens);

// Expands a path, a directory (its *.bin files) or a glob into sorted shard paths; throws Error
// naming `key` when nothing matches.
std::vector<std::string> expand_shards(const std::string& spec, const std::string& key);

}  // namespace lmforge
