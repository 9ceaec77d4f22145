#include "lmforge/tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <atomic>
#include <cctype>

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

void BpeTokenizer::add_special(const std::string& text, int32_t id, uint8_t flags) {
  if (static_cast<size_t>(id) >= vocab_.size()) {
    vocab_.resize(id + 1);
    is_special_.resize(id + 1, false);
  }
  vocab_[id] = text;
  is_special_[id] = true;
  specials_[text] = id;
  if (flags)
    added_flags_[text] = flags;
  else
    added_flags_.erase(text);
  has_not_special_ = false;
  for (auto& [t, f] : added_flags_) has_not_special_ = has_not_special_ || (f & kNotSpecial);
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
    bool pending_unk = false;  // an unknown character whose unk is not pushed yet (fusing)
    auto known = [&] {
      if (pending_unk) ids.push_back(unk_);
      pending_unk = false;
    };
    for (size_t i = 0; i < piece.size();) {
      size_t n = utf8_len(piece, i);
      bool fallback = byte_fallback_;
      for (size_t k = 0; fallback && k < n; ++k)
        fallback = fallback_id_[static_cast<unsigned char>(piece[i + k])] >= 0;
      if (int32_t id = ids_.find(piece.substr(i, n)); id >= 0) {
        known();
        ids.push_back(id);
      } else if (fallback) {
        known();
        for (size_t k = 0; k < n; ++k)
          ids.push_back(fallback_id_[static_cast<unsigned char>(piece[i + k])]);
      } else if (unk_ >= 0) {  // as Hugging Face: one unk per character, or per run when fused
        if (!fuse_unk_) known();
        pending_unk = true;
      }
      i += n;
    }
    known();
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
  std::string in_form;  // text in the normal form
  if (normal_form_ != NormalForm::kNone) {
    in_form = normalize_utf8(text, normal_form_);
    text = in_form;
  }
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
    normalized.reserve(text.size() + 1);
    normalized.push_back(' ');
    normalized.append(text);
    text = normalized;
  }
  auto split = [&](std::string_view run) {
    if (pre_)
      pre_->split(run, [&](std::string_view piece) { encode_piece(piece, out); });
    else
      encode_piece(run, out);
  };
  if (digits_)
    digits_->split_marked(text, [&](std::string_view piece, bool digits) {
      if (digits)
        encode_piece(piece, out);
      else
        split(piece);
    });
  else
    split(text);
}

void BpeTokenizer::set_digits(bool individual) {
  // Rust's char::is_numeric, which Hugging Face's Digits uses: the Unicode categories N*.
  digits_ = std::make_unique<Pretokenizer>(individual ? R"(\p{N})" : R"(\p{N}+)", "Digits");
}

namespace {

// The length of the Unicode White_Space character at text[i] (Rust's char::is_whitespace, which
// Hugging Face's lstrip/rstrip use), or 0.
size_t whitespace_at(std::string_view text, size_t i) {
  if (i >= text.size()) return 0;
  const auto b = [&](size_t k) {
    return k < text.size() ? static_cast<unsigned char>(text[k]) : 0;
  };
  const unsigned char c = b(i);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return 1;
  if (c == 0xC2 && (b(i + 1) == 0x85 || b(i + 1) == 0xA0)) return 2;  // U+0085, U+00A0
  if (c == 0xE1 && b(i + 1) == 0x9A && b(i + 2) == 0x80) return 3;    // U+1680
  if (c == 0xE2 && b(i + 1) == 0x80) {
    const unsigned char d = b(i + 2);  // U+2000..200A, U+2028, U+2029, U+202F
    if ((d >= 0x80 && d <= 0x8A) || d == 0xA8 || d == 0xA9 || d == 0xAF) return 3;
  }
  if (c == 0xE2 && b(i + 1) == 0x81 && b(i + 2) == 0x9F) return 3;  // U+205F
  if (c == 0xE3 && b(i + 1) == 0x80 && b(i + 2) == 0x80) return 3;  // U+3000
  return 0;
}

// The length of the White_Space character that ends at text[end) and starts at or after lo.
size_t whitespace_before(std::string_view text, size_t lo, size_t end) {
  for (size_t n = 1; n <= 3 && n <= end - lo; ++n)
    if (whitespace_at(text, end - n) == n) return n;
  return 0;
}

}  // namespace

uint8_t BpeTokenizer::added_flags(std::string_view text) const {
  auto f = added_flags_.find(std::string(text));
  return f == added_flags_.end() ? 0 : f->second;
}

void BpeTokenizer::encode_run(std::string_view text, bool at_start, bool allow_special,
                              std::vector<int32_t>& out) const {
  size_t start = 0;
  if ((allow_special && !specials_.empty()) || has_not_special_) {
    for (size_t i = 0; i < text.size(); ++i) {
      const auto& cands = specials_by_first_[static_cast<unsigned char>(text[i])];
      for (const std::string& s : cands) {  // longest first
        if (text.compare(i, s.size(), s) != 0) continue;
        const uint8_t flags = added_flags(s);
        if (!allow_special && !(flags & kNotSpecial)) continue;
        size_t end = i;  // of the ordinary text before the token
        if (flags & kLstrip)
          while (size_t n = whitespace_before(text, start, end)) end -= n;
        encode_ordinary(text.substr(start, end - start), at_start && start == 0, out);
        out.push_back(specials_.at(s));
        size_t next = i + s.size();
        if (flags & kRstrip)
          while (size_t n = whitespace_at(text, next)) next += n;
        i = next - 1;
        start = next;
        break;
      }
    }
  }
  encode_ordinary(text.substr(start), at_start && start == 0, out);
}

void BpeTokenizer::encode_append(std::string_view text, std::vector<int32_t>& out,
                                 bool allow_special, bool add_bos) const {
  if (add_bos && bos_ >= 0) out.push_back(bos_);
  encode_run(text, /*at_start=*/true, allow_special, out);
}

void BpeTokenizer::encode_segments(const std::vector<Segment>& segments, std::vector<int32_t>& out,
                                   std::vector<size_t>* ends) const {
  size_t at = 0;  // bytes of the concatenation before the segment
  for (size_t k = 0; k < segments.size(); ++k) {
    const Segment& seg = segments[k];
    if (seg.special) {
      out.push_back(special_id_or_fail(seg.text));
    } else {
      std::string_view t = seg.text;
      size_t from = at;
      if (k > 0 && segments[k - 1].special && (added_flags(segments[k - 1].text) & kRstrip))
        while (size_t n = whitespace_at(t, 0)) t.remove_prefix(n), from += n;
      if (k + 1 < segments.size() && segments[k + 1].special &&
          (added_flags(segments[k + 1].text) & kLstrip))
        while (size_t n = whitespace_before(t, 0, t.size())) t.remove_suffix(n);
      encode_run(t, from == 0, /*allow_special=*/false, out);
    }
    at += seg.text.size();
    if (ends) ends->push_back(out.size());
  }
}

std::string BpeTokenizer::token_bytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_.size()) return "";
  const std::string& t = vocab_[id];
  if (symbols_ == Symbols::kCharsWithByteFallback && !is_special_[id]) {
    if (t.size() == 6 && t.starts_with("<0x") && t.back() == '>' && byte_fallback_ &&
        std::isxdigit(static_cast<unsigned char>(t[3])) &&
        std::isxdigit(static_cast<unsigned char>(t[4]))) {  // else an ordinary token's text
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
