#include "lmforge/tokenizer/bpe_trainer.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/formats/formats.h"
#include "lmforge/tokenizer/known_encodings.h"
#include "lmforge/tokenizer/pretokenizer.h"

namespace lmforge {

namespace {

constexpr size_t kChunk = 4 << 20;

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

using Counts = std::unordered_map<std::string, uint64_t>;

// Adds the counts of text's pieces; the special strings are cut out first (as Hugging Face's
// trainer does with added tokens), so no merge learns from them.
void count_text(std::string_view text, const Pretokenizer& pre,
                const std::vector<std::string>& specials, Counts& counts) {
  // Each special's next occurrence, searched again only once the cut has passed it: one scan
  // of the text per special.
  std::vector<size_t> next;
  for (const std::string& s : specials) next.push_back(text.find(s));
  size_t from = 0;
  while (from < text.size()) {
    size_t at = text.size(), len = 0;
    for (size_t i = 0; i < specials.size(); ++i) {
      if (next[i] < from) next[i] = text.find(specials[i], from);
      if (next[i] != std::string_view::npos &&
          (next[i] < at || (next[i] == at && specials[i].size() > len)))
        at = next[i], len = specials[i].size();
    }
    pre.split(text.substr(from, at - from), [&](std::string_view p) { ++counts[std::string(p)]; });
    from = at + len;
  }
}

// Reads `path` in ~4 MB chunks and adds its pieces' counts. A chunk is cut after a newline that
// a non-space follows, where no pre-tokenizer pattern joins the two sides (after any newline, a run
// of them, "\n\n", would be counted as two pieces that encode never makes).
size_t chunk_cut(const std::string& chunk) {
  auto space = [](char c) { return c == '\n' || c == '\r' || c == ' ' || c == '\t'; };
  for (size_t p = chunk.rfind('\n'); p != std::string::npos;
       p = p > 0 ? chunk.rfind('\n', p - 1) : std::string::npos)
    if (p + 1 < chunk.size() && !space(chunk[p + 1])) return p;
  return chunk.rfind('\n');  // (only newlines followed by spaces: the last one)
}

// (`left`: the bytes still to read of all the inputs)
void count_file(const std::string& path, const Pretokenizer& pre,
                const std::vector<std::string>& specials, Counts& counts, uint64_t& bytes,
                uint64_t& left) {
  check_not_directory(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open the training text; check the path", path);
  std::string carry, buf(kChunk, '\0');
  for (bool more = left > 0; more;) {
    in.read(buf.data(), static_cast<std::streamsize>(std::min<uint64_t>(buf.size(), left)));
    const auto got = static_cast<uint64_t>(in.gcount());
    std::string chunk = carry + buf.substr(0, got);
    bytes += got;
    left -= got;
    more = in && left > 0;
    size_t cut = more ? chunk_cut(chunk) : std::string::npos;
    if (cut == std::string::npos) {
      carry.clear();
      if (more) {  // no newline in 4 MB: cut anyway at a UTF-8 boundary
        cut = chunk.size();
        while (cut > 0 && (static_cast<unsigned char>(chunk[cut - 1]) & 0xC0) == 0x80) --cut;
        carry = chunk.substr(cut > 0 ? cut - 1 : 0);
        chunk.resize(cut > 0 ? cut - 1 : 0);
      }
    } else {
      carry = chunk.substr(cut + 1);
      chunk.resize(cut + 1);
    }
    count_text(chunk, pre, specials, counts);
  }
}

}  // namespace

BpeTrainResult train_bpe(const std::vector<std::string>& files, const BpeTrainOptions& o) {
  const int64_t n_special = static_cast<int64_t>(o.specials.size());
  for (size_t i = 0; i < o.specials.size(); ++i) {
    if (o.specials[i].empty()) fail("--special: an empty special token is not allowed");
    for (size_t k = 0; k < i; ++k)
      if (o.specials[k] == o.specials[i]) fail("--special: \"{}\" is given twice", o.specials[i]);
  }
  if (o.vocab_size < 256 + n_special)
    fail("--vocab-size: {} is below the 256 byte tokens plus {} specials", o.vocab_size, n_special);
  if (files.empty()) fail("tokenizer train: no input files given");
  std::string pattern = o.pattern.empty() ? kCl100kPattern : o.pattern;
  Pretokenizer pre(pattern, "--pattern");

  BpeTrainResult res;
  Counts counts;
  uint64_t left = o.max_bytes > 0 ? o.max_bytes : UINT64_MAX;
  for (const std::string& f : files) count_file(f, pre, o.specials, counts, res.bytes_read, left);
  res.distinct_pieces = counts.size();
  if (counts.empty())  // (a tokenizer of the 256 bytes alone, learnt from nothing)
    fail("tokenizer train: no text in {}; give files with text to learn from",
         files.size() == 1 ? files[0] : fmt::format("the {} files", files.size()));

  // Words in a fixed order (sorted bytes) so ids and tie-breaks never depend on hashing.
  std::vector<std::pair<std::string, uint64_t>> sorted(counts.begin(), counts.end());
  counts.clear();
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<uint64_t> freq(sorted.size());
  for (size_t w = 0; w < sorted.size(); ++w) {
    for (unsigned char c : sorted[w].first) words[w].push_back(c);
    freq[w] = sorted[w].second;
  }
  sorted.clear();

  std::vector<std::string> vocab(256);
  for (int b = 0; b < 256; ++b) vocab[b] = std::string(1, static_cast<char>(b));
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::unordered_set<int32_t>> where;
  for (size_t w = 0; w < words.size(); ++w)
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      uint64_t k = pair_key(words[w][i], words[w][i + 1]);
      pair_count[k] += freq[w];
      where[k].insert(static_cast<int32_t>(w));
    }
  // Max-heap by count, then the smaller pair key; stale entries are skipped when popped.
  using Entry = std::pair<int64_t, uint64_t>;
  auto cmp = [](const Entry& x, const Entry& y) {
    return x.first != y.first ? x.first < y.first : x.second > y.second;
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> heap(cmp);
  for (auto& [k, c] : pair_count) heap.push({c, k});

  std::vector<std::pair<int32_t, int32_t>> merges;
  const int64_t target_merges = o.vocab_size - 256 - n_special;
  while (static_cast<int64_t>(merges.size()) < target_merges && !heap.empty()) {
    auto [c, k] = heap.top();
    heap.pop();
    auto it = pair_count.find(k);
    if (it == pair_count.end() || it->second != c) continue;  // stale
    if (c < o.min_frequency) break;
    int32_t a = static_cast<int32_t>(k >> 32), b = static_cast<int32_t>(k & 0xffffffffu);
    int32_t id = static_cast<int32_t>(vocab.size());
    vocab.push_back(vocab[a] + vocab[b]);
    merges.emplace_back(a, b);
    std::unordered_set<int32_t> affected = std::move(where[k]);
    where.erase(k);
    pair_count.erase(k);
    std::unordered_map<uint64_t, int64_t> delta;
    std::vector<int32_t> sorted_words(affected.begin(), affected.end());
    std::sort(sorted_words.begin(), sorted_words.end());
    for (int32_t w : sorted_words) {
      std::vector<int32_t>& s = words[w];
      const int64_t f = static_cast<int64_t>(freq[w]);
      for (size_t i = 0; i + 1 < s.size(); ++i) delta[pair_key(s[i], s[i + 1])] -= f;
      std::vector<int32_t> t;
      t.reserve(s.size());
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          t.push_back(id);
          ++i;
        } else {
          t.push_back(s[i]);
        }
      }
      s.swap(t);
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        uint64_t nk = pair_key(s[i], s[i + 1]);
        delta[nk] += f;
        where[nk].insert(w);
      }
    }
    for (auto& [pk, d] : delta) {
      if (d == 0 || pk == k) continue;
      int64_t& pc = pair_count[pk];
      pc += d;
      if (pc <= 0) {
        pair_count.erase(pk);
      } else if (d > 0) {
        heap.push({pc, pk});
      } else {
        heap.push({pc, pk});  // lowered: the old entry is now stale
      }
    }
  }

  // tokenizer.json: vocabulary strings in GPT-2's byte<->unicode form; merges as pairs.
  // The vocabulary's object is written by hand, as dump(1) writes it: nlohmann's ordered object
  // finds a key in linear time, which made it quadratic in the vocabulary (2.8 s of 9.2 at 32k).
  using nlohmann::ordered_json;
  std::unordered_set<std::string> seen;
  int32_t next_id = 0;
  std::vector<std::string> id_str;
  std::string vocab_text = "{";
  for (const std::string& t : vocab) {
    std::string u = gpt2_bytes_to_unicode(t);
    if (!seen.insert(u).second) continue;  // two merges spelling the same bytes: one token
    vocab_text += next_id ? ",\n   " : "\n   ";
    vocab_text += nlohmann::json(u).dump() + ": " + std::to_string(next_id++);
    id_str.push_back(u);
  }
  vocab_text += next_id ? "\n  }" : "}";
  const std::string vocab_slot = "\x01vocab\x01";  // (no token's text: those are printable)
  ordered_json jm = ordered_json::array();
  for (auto& [a, b] : merges)
    jm.push_back({gpt2_bytes_to_unicode(vocab[a]), gpt2_bytes_to_unicode(vocab[b])});
  ordered_json added = ordered_json::array();
  for (const std::string& s : o.specials) {
    added.push_back({{"id", next_id},
                     {"content", s},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
    ++next_id;  // specials live in added_tokens only, as in HF's Llama 3 tokenizer.json
  }
  ordered_json j = {{"version", "1.0"},
                    {"truncation", nullptr},
                    {"padding", nullptr},
                    {"added_tokens", added},
                    {"normalizer", nullptr},
                    {"pre_tokenizer",
                     {{"type", "Sequence"},
                      {"pretokenizers", ordered_json::array({{{"type", "Split"},
                                                              {"pattern", {{"Regex", pattern}}},
                                                              {"behavior", "Isolated"},
                                                              {"invert", false}},
                                                             {{"type", "ByteLevel"},
                                                              {"add_prefix_space", false},
                                                              {"trim_offsets", true},
                                                              {"use_regex", false}}})}}},
                    {"post_processor", nullptr},
                    {"decoder",
                     {{"type", "ByteLevel"},
                      {"add_prefix_space", true},
                      {"trim_offsets", true},
                      {"use_regex", true}}},
                    {"model",
                     {{"type", "BPE"},
                      {"dropout", nullptr},
                      {"unk_token", nullptr},
                      {"continuing_subword_prefix", nullptr},
                      {"end_of_word_suffix", nullptr},
                      {"fuse_unk", false},
                      {"byte_fallback", false},
                      {"ignore_merges", false},
                      {"vocab", vocab_slot},
                      {"merges", jm}}}};
  res.tokenizer_json = j.dump(1) + "\n";
  const std::string slot = nlohmann::json(vocab_slot).dump();
  res.tokenizer_json.replace(res.tokenizer_json.find(slot), slot.size(), vocab_text);
  res.merges = static_cast<int64_t>(merges.size());
  res.vocab_size = next_id;
  return res;
}

}  // namespace lmforge
