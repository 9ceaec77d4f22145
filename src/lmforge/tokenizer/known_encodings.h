// The public tiktoken-format encodings lmforge recognises by their number of ranks, so that a
// bare rank file (e.g. Llama 3's tokenizer.model) gets its pre-tokenizer pattern and special
// tokens without a side file. A sibling <name>.json ({"pat_str", "special_tokens"}) overrides.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lmforge {

struct KnownEncoding {
  std::string name;
  size_t n_ranks;
  std::string pattern;
  std::vector<std::pair<std::string, int32_t>> specials;
  std::string bos, eos;  // special names ("" = none)
  // The same pattern as older tiktoken releases spelled it (the .json files written from them
  // carry these): the same encoding, so the same fingerprint.
  std::vector<std::string> spellings = {};
  bool same_pattern(const std::string& p) const {
    return p == pattern || std::find(spellings.begin(), spellings.end(), p) != spellings.end();
  }
};

const KnownEncoding* known_encoding_for_ranks(size_t n_ranks);

// Pre-tokenizer patterns shared by several formats: GPT-2's (also HF's ByteLevel use_regex) and
// GPT-4's cl100k (the default of `tokenizer train`).
extern const char* const kGpt2Pattern;
extern const char* const kCl100kPattern;

}  // namespace lmforge
