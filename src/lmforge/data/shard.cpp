#include "lmforge/data/shard.h"

#include <glob.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/mapped_file.h"

namespace lmforge {

TokenShard TokenShard::open(const std::string& path) {
  auto m = MappedFile::open(path, "check data.train / data.val");
  size_t size = m->size();
  if (size < kShardHeaderBytes)
    fail("{}: not a token shard (only {} bytes, header needs {}); re-create it", path, size,
         kShardHeaderBytes);
  const char* base = m->data();
  if (std::memcmp(base, kShardMagic, 8) != 0)
    fail("{}: bad magic (not an lmforge token shard); make shards with lmforge", path);
  uint32_t version, width;
  uint64_t count;
  std::memcpy(&version, base + 8, 4);
  std::memcpy(&width, base + 12, 4);
  std::memcpy(&count, base + 16, 8);
  if (version != 1 && version != kShardVersion)
    fail("{}: shard version {} is not supported (this lmforge reads 1 and {}); re-create the shard",
         path, version, kShardVersion);
  if (width != 2 && width != 4) fail("{}: token width {} bytes is invalid (2 or 4)", path, width);
  uint64_t docs = 0;
  TokenShard s;
  if (version >= 2) {
    std::memcpy(&docs, base + 24, 8);
    std::memcpy(&s.tok_.vocab_size, base + 32, 8);
    std::memcpy(&s.tok_.bos, base + 40, 4);
    std::memcpy(&s.tok_.eos, base + 44, 4);
    s.tok_.fingerprint.assign(base + 48, strnlen(base + 48, 16));
    s.tok_.kind.assign(base + 64, strnlen(base + 64, 16));
  }
  uint64_t index_bytes = docs ? (docs + 1) * 8 : 0;
  if (count > size || docs > size || kShardHeaderBytes + count * width + index_bytes != size)
    fail(
        "{}: header says {} tokens and {} documents but the file holds {} bytes after the "
        "header; the shard is truncated or corrupt, re-create it",
        path, count, docs, size - kShardHeaderBytes);
  s.version_ = version;
  if (docs) {
    s.docs_ = reinterpret_cast<const uint64_t*>(base + kShardHeaderBytes + count * width);
    s.docs_n_ = docs;
    if (s.docs_[0] != 0 || s.docs_[docs] != count)
      fail("{}: the document index does not span the tokens; the shard is corrupt", path);
  }
  s.path_ = path;
  s.map_ = m;
  s.n_ = static_cast<int64_t>(count);
  if (width == 2)
    s.u16_ = reinterpret_cast<const uint16_t*>(base + kShardHeaderBytes);
  else
    s.u32_ = reinterpret_cast<const uint32_t*>(base + kShardHeaderBytes);
  return s;
}

uint32_t TokenShard::max_token() const {
  uint32_t mx = 0;
  for (int64_t i = 0; i < n_; ++i) mx = std::max(mx, (*this)[i]);
  return mx;
}

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_starts, const ShardTokenizerInfo& tok) {
  bool small = std::all_of(tokens.begin(), tokens.end(), [](uint32_t t) { return t < 65536; });
  char header[kShardHeaderBytes] = {};
  uint32_t version = kShardVersion, width = small ? 2 : 4;
  uint64_t count = tokens.size(), docs = doc_starts.size();
  std::memcpy(header, kShardMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &width, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + 24, &docs, 8);
  std::memcpy(header + 32, &tok.vocab_size, 8);
  std::memcpy(header + 40, &tok.bos, 4);
  std::memcpy(header + 44, &tok.eos, 4);
  std::memcpy(header + 48, tok.fingerprint.data(), std::min<size_t>(16, tok.fingerprint.size()));
  std::memcpy(header + 64, tok.kind.data(), std::min<size_t>(16, tok.kind.size()));
  AtomicFile f(path);
  f.write(header, sizeof(header));
  if (small) {
    std::vector<uint16_t> t16(tokens.begin(), tokens.end());
    f.write(t16.data(), t16.size() * 2);
  } else {
    f.write(tokens.data(), tokens.size() * 4);
  }
  if (docs) {
    LMF_CHECK(doc_starts[0] == 0, "document index must start at 0");
    f.write(doc_starts.data(), docs * 8);
    f.write(&count, 8);
  }
  f.commit();
}

std::vector<std::string> expand_shards(const std::string& spec, const std::string& key) {
  namespace fs = std::filesystem;
  std::vector<std::string> out;
  if (spec.empty())
    fail("{}: no shard path given; set {} to a shard file, directory or glob", key, key);
  std::error_code ec;
  if (fs::is_directory(spec, ec)) {
    // A prepared source directory holds train-*.bin and val-*.bin: take the split the key names.
    std::string split = key.ends_with(".val") ? "val-" : "train-";
    std::vector<std::string> all;
    bool prepared = false;
    for (auto& e : fs::directory_iterator(spec))
      if (e.path().extension() == ".bin") {
        std::string name = e.path().filename().string();
        all.push_back(e.path().string());
        prepared = prepared || name.starts_with("train-") || name.starts_with("val-");
        if (name.starts_with(split)) out.push_back(e.path().string());
      }
    if (prepared && out.empty())
      fail(
          "{}: {} holds no {}*.bin shards (was it prepared with val_fraction 0, or with too few "
          "documents?)",
          key, spec, split);
    if (!prepared) out = all;
  } else if (spec.find_first_of("*?[") != std::string::npos) {
    glob_t g{};
    if (::glob(spec.c_str(), 0, nullptr, &g) == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
    globfree(&g);
  } else {
    if (!fs::exists(spec, ec)) fail("{}: {}: no such file; check the path", key, spec);
    out.push_back(spec);
  }
  if (out.empty()) fail("{}: {} matches no shard files (*.bin)", key, spec);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace lmforge
