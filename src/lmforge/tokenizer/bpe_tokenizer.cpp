#include "lmforge/tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <atomic>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {
constexpr std::string_view kMeta = "\xE2\x96\x81";  // U+2581 "▁"
constexpr size_t kCacheMax = 1 << 18;               // ~20 MB per thread at most
constexpr size_t kCachePieceMax = 256;              // bytes

// Length of the UTF-8 character at s[i]; 1 for a byte that does not start a complete one (an
// invalid lead byte, or one whose continuation bytes are missing), so that an invalid byte never
// swallows the valid character after it.
size_t utf8_len(std::string_view s, size_t i) {
  unsigned char c = s[i];
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  return n;
}
}  // namespace

BpeTokenizer::BpeTokenizer() {
  static std::atomic<uint64_t> next{1};
  serial_ = next++;
}

BpeTokenizer::PieceCache& BpeTokenizer::cache() const {
  thread_local std::vector<std::pair<uint64_t, PieceCache>> caches;
  for (auto& [serial, c] : caches)
    if (serial == serial_) return c;
  if (caches.size() >= 8) caches.erase(caches.begin());  // tokenizers come and go in tests
  caches.emplace_back(serial_, PieceCache{});
  return caches.back().second;
}

void BpeTokenizer::add_token(int32_t id, std::string bytes) {
  LMF_CHECK(id >= 0, "negative token id {}", id);
  if (static_cast<size_t>(id) >= vocab_.size()) {
    vocab_.resize(id + 1);
    is_special_.resize(id + 1, false);
  }
  ids_.insert(bytes, id);  // first registration of the same bytes wins
  vocab_[id] = std::move(bytes);
}

void BpeTokenizer::add_special(const std::string& text, int32_t id) {
  if (static_cast<size_t>(id) >= vocab_.size()) {
    vocab_.resize(id + 1);
    is_special_.resize(id + 1, false);
  }
  vocab_[id] = text;
  is_special_[id] = true;
  specials_[text] = id;
}

int32_t BpeTokenizer::id_of(std::string_view bytes) const { return ids_.find(bytes); }

void BpeTokenizer::finalize() {
  for (int b = 0; b < 256; ++b) {
    byte_id_[b] = id_of(std::string(1, static_cast<char>(b)));
    fallback_id_[b] = id_of(fmt::format("<0x{:02X}>", b));
  }
  if (symbols_ == Symbols::kBytes)
    for (int b = 0; b < 256; ++b)
      if (byte_id_[b] < 0) fail("{}: byte 0x{:02X} has no token; not a byte-level BPE", source_, b);
  for (auto& s : specials_by_first_) s.clear();
  for (auto& [text, id] : specials_)
    if (!text.empty()) specials_by_first_[static_cast<unsigned char>(text[0])].push_back(text);
  for (auto& s : specials_by_first_)
    std::sort(s.begin(), s.end(), [](auto& a, auto& b) { return a.size() > b.size(); });
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  // Whole-piece hits (most words) first: they never enter the cache, which keeps it for the
  // pieces that need merging.
  if (whole_piece_) {
    if (int32_t id = ids_.find(piece); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  thread_local std::string key;  // reused: lookups allocate nothing
  key.assign(piece.data(), piece.size());
  PieceCache& cache = this->cache();
  if (auto it = cache.find(key); it != cache.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  std::vector<int32_t> ids;
  ids.reserve(piece.size());
  if (symbols_ == Symbols::kBytes) {
    for (unsigned char c : piece) ids.push_back(byte_id_[c]);
  } else {
    for (size_t i = 0; i < piece.size();) {
      size_t n = utf8_len(piece, i);
      if (int32_t id = ids_.find(piece.substr(i, n)); id >= 0) {
        ids.push_back(id);
      } else if (byte_fallback_) {
        for (size_t k = 0; k < n; ++k) {
          int32_t f = fallback_id_[static_cast<unsigned char>(piece[i + k])];
          ids.push_back(f >= 0 ? f : unk_);
        }
      } else if (unk_ >= 0) {
        ids.push_back(unk_);
      }
      i += n;
    }
  }
  engine_.merge(ids);
  out.insert(out.end(), ids.begin(), ids.end());
  // Long pieces (whole documents when there is no pre-tokenizer) rarely repeat.
  if (piece.size() > kCachePieceMax) return;
  if (cache.size() >= kCacheMax) cache.clear();
  cache.emplace(key, std::move(ids));
}

void BpeTokenizer::encode_ordinary(std::string_view text, bool at_start,
                                   std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string normalized;
  if (metaspace_) {
    // Spaces become "▁" first: a run that starts with a space starts with "▁" (HF Metaspace).
    bool starts_with_meta = text[0] == ' ' || text.starts_with(kMeta);
    if (prepend_ == Prepend::kEvery ||
        (!starts_with_meta &&
         (prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && at_start))))
      normalized = kMeta;
    for (char c : text) {
      if (c == ' ')
        normalized += kMeta;
      else
        normalized += c;
    }
    text = normalized;
  } else if (add_prefix_space_ && text[0] != ' ') {
    normalized = " " + std::string(text);
    text = normalized;
  }
  if (pre_)
    pre_->split(text, [&](std::string_view piece) { encode_piece(piece, out); });
  else
    encode_piece(text, out);
}

void BpeTokenizer::encode_append(std::string_view text, std::vector<int32_t>& out,
                                 bool allow_special, bool add_bos) const {
  if (add_bos && bos_ >= 0) out.push_back(bos_);
  size_t start = 0;
  if (allow_special && !specials_.empty()) {
    for (size_t i = 0; i < text.size(); ++i) {
      const auto& cands = specials_by_first_[static_cast<unsigned char>(text[i])];
      for (const std::string& s : cands) {
        if (text.compare(i, s.size(), s) == 0) {
          encode_ordinary(text.substr(start, i - start), start == 0, out);
          out.push_back(specials_.at(s));
          i += s.size() - 1;
          start = i + 1;
          break;
        }
      }
    }
  }
  encode_ordinary(text.substr(start), start == 0, out);
}

std::string BpeTokenizer::token_bytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_.size()) return "";
  const std::string& t = vocab_[id];
  if (symbols_ == Symbols::kCharsWithByteFallback && !is_special_[id]) {
    if (t.size() == 6 && t.starts_with("<0x") && t.back() == '>' && byte_fallback_) {
      return std::string(1, static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
    }
  }
  if (!metaspace_ || is_special_[id]) return t;
  std::string s;
  for (size_t i = 0; i < t.size();) {
    if (t.compare(i, kMeta.size(), kMeta) == 0) {
      s += ' ';
      i += kMeta.size();
    } else {
      s += t[i++];
    }
  }
  return s;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t id : ids) s += token_bytes(id);
  // SentencePiece-style decoders strip the one space that "prepend" added.
  if (metaspace_ && prepend_ != Prepend::kNever && !s.empty() && s[0] == ' ') s.erase(0, 1);
  return s;
}

}  // namespace lmforge
