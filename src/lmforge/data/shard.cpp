#include "lmforge/data/shard.h"

#include <glob.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

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
  if (version != 1 && version != kShardVersion && version != kShardVersionMasked)
    fail("{}: shard version {} is not supported (this lmforge reads 1 to {}); re-create the shard",
         path, version, kShardVersionMasked);
  if (width != 2 && width != 4) fail("{}: token width {} bytes is invalid (2 or 4)", path, width);
  uint64_t docs = 0;
  uint32_t flags = 0;
  TokenShard s;
  if (version >= 2) {
    std::memcpy(&docs, base + 24, 8);
    std::memcpy(&s.tok_.vocab_size, base + 32, 8);
    std::memcpy(&s.tok_.bos, base + 40, 4);
    std::memcpy(&s.tok_.eos, base + 44, 4);
    s.tok_.fingerprint.assign(base + 48, strnlen(base + 48, 16));
    s.tok_.kind.assign(base + 64, strnlen(base + 64, 16));
    // (printable ASCII, NUL-padded: other bytes would reach messages as they are)
    for (const std::string* field : {&s.tok_.fingerprint, &s.tok_.kind})
      for (char c : *field)
        if (c < 0x20 || c > 0x7e)
          fail(
              "{}: the header's tokenizer {} is not ASCII text; the shard is corrupt, re-create it",
              path, field == &s.tok_.kind ? "kind (bytes 64-79)" : "fingerprint (bytes 48-63)");
  }
  if (version >= 3) std::memcpy(&flags, base + 80, 4);
  if (flags & ~7u) fail("{}: unknown shard flags {:#x}; re-create the shard", path, flags);
  if (flags & 2u && (!(flags & 1u) || docs % 2))
    fail("{}: a preference shard needs a loss mask and pairs of documents; re-create it", path);
  if (flags & 4u && (!(flags & 1u) || flags & 2u || docs == 0))
    fail(
        "{}: a shard of labelled responses needs a loss mask and a document index, and no pairs; "
        "re-create it",
        path);
  s.paired_ = flags & 2u;
  const uint64_t index_bytes = docs ? (docs + 1) * 8 : 0;
  const uint64_t mask_bytes = flags & 1u ? (count + 7) / 8 : 0;
  const uint64_t label_bytes = flags & 4u ? docs : 0;
  if (count > size || docs > size ||
      kShardHeaderBytes + count * width + index_bytes + mask_bytes + label_bytes != size)
    fail(
        "{}: header says {} tokens and {} documents but the file holds {} bytes after the "
        "header; the shard is truncated or corrupt, re-create it",
        path, count, docs, size - kShardHeaderBytes);
  s.version_ = version;
  if (docs) {
    s.docs_ = base + kShardHeaderBytes + count * width;
    s.docs_n_ = docs;
    if (s.doc_start(0) != 0 ||
        s.doc_start(static_cast<int64_t>(docs)) != static_cast<int64_t>(count))
      fail("{}: the document index does not span the tokens; the shard is corrupt", path);
    for (uint64_t d = 0, prev = 0; d <= docs; ++d) {  // offsets within [0, N], never decreasing
      const uint64_t at = static_cast<uint64_t>(s.doc_start(static_cast<int64_t>(d)));
      if (at < prev || at > count)
        fail(
            "{}: document {} of the index starts at token {} (after {}, of {}); the shard is "
            "corrupt, re-create it",
            path, d, at, prev, count);
      prev = at;
    }
  }
  if (mask_bytes)
    s.mask_ =
        reinterpret_cast<const uint8_t*>(base + kShardHeaderBytes + count * width + index_bytes);
  if (label_bytes) {
    s.labels_ = reinterpret_cast<const uint8_t*>(base + kShardHeaderBytes + count * width +
                                                 index_bytes + mask_bytes);
    for (uint64_t d = 0; d < docs; ++d)
      if (s.labels_[d] > 1)
        fail("{}: document {} has label {} (0 or 1); the shard is corrupt, re-create it", path, d,
             s.labels_[d]);
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

namespace {
constexpr size_t kStageBytes = 1 << 20;
}

ShardWriter::ShardWriter(const std::string& path, const ShardTokenizerInfo& tok, uint32_t width,
                         bool loss_mask, bool paired, bool labelled)
    : file_(std::make_unique<AtomicFile>(path)),
      path_(path),
      tok_(tok),
      width_(width),
      masked_(loss_mask || paired || labelled),
      paired_(paired),
      labelled_(labelled) {
  LMF_CHECK(width == 2 || width == 4, "shard token width must be 2 or 4");
  LMF_CHECK(!(paired && labelled), "a shard of pairs or of labelled responses, not both");
  char header[kShardHeaderBytes] = {};  // counts filled in by commit()
  file_->write(header, sizeof(header));
  stage_.resize(kStageBytes);
}

ShardWriter::~ShardWriter() = default;

void ShardWriter::append(const int32_t* ids, size_t n, const uint8_t* is_target) {
  LMF_CHECK(masked_ || !is_target, "{}: a loss mask for a shard made without one", path_);
  if (masked_) {
    mask_.resize((count_ + n + 7) / 8);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t at = count_ + i;
      if (!is_target || is_target[i]) mask_[at >> 3] |= static_cast<uint8_t>(1u << (at & 7));
    }
  }
  while (n > 0) {  // in runs that fit the staging buffer (branch-free inner loops)
    if (staged_ + width_ > stage_.size()) flush();
    const size_t k = std::min(n, (stage_.size() - staged_) / width_);
    uint8_t* dst = stage_.data() + staged_;
    if (width_ == 2) {
      uint32_t high = 0;  // bits above 16 of any id: it does not fit
      for (size_t i = 0; i < k; ++i) {
        const auto id = static_cast<uint32_t>(ids[i]);
        high |= id >> 16;
        const auto v = static_cast<uint16_t>(id);
        std::memcpy(dst + 2 * i, &v, 2);
      }
      LMF_CHECK(high == 0, "{}: a token id >= 65536 does not fit a u16 shard", path_);
    } else {
      std::memcpy(dst, ids, k * 4);
    }
    staged_ += k * width_;
    count_ += k;
    ids += k;
    n -= k;
  }
}

void ShardWriter::flush() {
  file_->write(stage_.data(), staged_);
  staged_ = 0;
}

void ShardWriter::commit() {
  flush();
  uint64_t docs = starts_.size();
  if (docs) {
    LMF_CHECK(starts_[0] == 0, "document index must start at 0");
    file_->write(starts_.data(), docs * 8);
    file_->write(&count_, 8);
  }
  if (masked_) file_->write(mask_.data(), mask_.size());
  LMF_CHECK(!paired_ || docs % 2 == 0, "{}: {} documents make no pairs", path_, docs);
  LMF_CHECK(!labelled_ || (docs > 0 && labels_.size() == docs), "{}: {} labels for {} documents",
            path_, labels_.size(), docs);
  if (labelled_) file_->write(labels_.data(), labels_.size());
  char header[kShardHeaderBytes] = {};
  const uint32_t version = masked_ ? kShardVersionMasked : kShardVersion,
                 flags = (masked_ ? 1u : 0u) | (paired_ ? 2u : 0u) | (labelled_ ? 4u : 0u);
  std::memcpy(header + 80, &flags, 4);
  std::memcpy(header, kShardMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &width_, 4);
  std::memcpy(header + 16, &count_, 8);
  std::memcpy(header + 24, &docs, 8);
  std::memcpy(header + 32, &tok_.vocab_size, 8);
  std::memcpy(header + 40, &tok_.bos, 4);
  std::memcpy(header + 44, &tok_.eos, 4);
  std::memcpy(header + 48, tok_.fingerprint.data(), std::min<size_t>(16, tok_.fingerprint.size()));
  std::memcpy(header + 64, tok_.kind.data(), std::min<size_t>(16, tok_.kind.size()));
  file_->overwrite(0, header, sizeof(header));
  file_->commit();
}

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_starts, const ShardTokenizerInfo& tok) {
  bool small = std::all_of(tokens.begin(), tokens.end(), [](uint32_t t) { return t < 65536; });
  ShardWriter w(path, tok, small ? 2 : 4);
  LMF_CHECK(doc_starts.empty() || doc_starts[0] == 0, "document index must start at 0");
  const auto* ids = reinterpret_cast<const int32_t*>(tokens.data());
  uint64_t begin = 0;
  for (size_t d = 0; d <= doc_starts.size(); ++d) {
    uint64_t end = d < doc_starts.size() ? doc_starts[d] : tokens.size();
    LMF_CHECK(end >= begin && end <= tokens.size(), "document starts must ascend within the shard");
    w.append(ids + begin, end - begin);
    if (d < doc_starts.size()) w.begin_document();
    begin = end;
  }
  w.commit();
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
    // Both splits of a prepared source (dir/*.bin): its validation documents would be trained
    // on, or its training documents scored as validation.
    auto named = [&](const char* prefix) {
      return std::any_of(out.begin(), out.end(), [&](const std::string& p) {
        return fs::path(p).filename().string().starts_with(prefix);
      });
    };
    if (named("train-") && named("val-"))
      fail(
          "{}: {} matches both train-*.bin and val-*.bin shards of a prepared source, so one split "
          "would be read as the other; name the directory (it takes the split {} reads) or a "
          "glob of one split",
          key, spec, key);
  } else {
    if (!fs::exists(spec, ec)) fail("{}: {}: no such file; check the path", key, spec);
    out.push_back(spec);
  }
  if (out.empty()) fail("{}: {} matches no shard files (*.bin)", key, spec);
  std::sort(out.begin(), out.end());
  // The output of a `prepare` that did not finish (stopped, out of memory, a full disk) holds the
  // shards written so far beside progress.json "complete": false, for a rerun to resume: not data
  // to train on.
  std::set<fs::path> dirs;
  for (const std::string& p : out) dirs.insert(fs::path(p).parent_path());
  for (const fs::path& d : dirs) {
    if (!fs::exists(d / "progress.json", ec)) continue;
    std::ifstream in(d / "progress.json");
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    // (prepare's own layout only: another tool's progress.json is not its business)
    const bool prepares = j.is_object() && j.contains("key") && j["key"].is_string() &&
                          j.contains("stats") && j["stats"].is_object() && j.contains("complete") &&
                          j["complete"].is_boolean();
    if (prepares && !j["complete"].get<bool>())
      fail(
          "{}: {} is the output of an `lmforge prepare` that did not finish (its progress.json "
          "says complete: false); run the same prepare again to finish it",
          key, d.empty() ? std::string(".") : d.string());
  }
  return out;
}

}  // namespace lmforge
