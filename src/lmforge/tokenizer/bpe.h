// BpeEngine: the one BPE merge loop behind every BPE format. Merges are keyed by the pair of
// adjacent token ids; the pair with the lowest rank merges first, leftmost on ties. That is
// tiktoken's semantics when built from a rank file (every split (a, b) of a token t gets rank(t))
// and Hugging Face's when built from a merges list (rank = line index).
//
//   BpeEngine e;
//   e.add_merge(left, right, merged, rank);
//   std::vector<int32_t> ids = {...initial symbols...};
//   e.merge(ids);   // in place
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace lmforge {

class BpeEngine {
 public:
  // A pair added twice keeps the lowest rank, or with last_wins the last one added (Hugging Face
  // builds its merge map from the list in order, so a repeated merge takes its later rank).
  void add_merge(int32_t left, int32_t right, int32_t merged, uint32_t rank,
                 bool last_wins = false);
  void reserve(size_t n) { merges_.reserve(n); }
  size_t size() const { return merges_.size(); }
  // Applies merges to ids until none applies.
  void merge(std::vector<int32_t>& ids) const;

  struct Rule {
    int32_t left, right, merged;
    uint32_t rank;
  };
  // Every merge, ordered by (rank, left, right): the merges list of a Hugging Face BPE model
  // that merges as this engine does. From a rank file that is transformers' TikTokenConverter
  // order (each token's splits at its rank, by the ranks of the two parts); from a merges list,
  // the list itself.
  std::vector<Rule> rules() const;

 private:
  struct Merge {
    uint32_t rank;
    int32_t merged;
  };
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  // Longer inputs (whole documents when a tokenizer has no pre-tokenizer) merge through a heap
  // instead of the linear scan, which is quadratic.
  static constexpr size_t kLinearMax = 128;
  void merge_long(std::vector<int32_t>& ids) const;

  std::unordered_map<uint64_t, Merge> merges_;
};

}  // namespace lmforge
