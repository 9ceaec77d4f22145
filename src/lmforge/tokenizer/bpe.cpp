#include "lmforge/tokenizer/bpe.h"

#include <limits>

namespace lmforge {

void BpeEngine::add_merge(int32_t left, int32_t right, int32_t merged, uint32_t rank) {
  auto [it, inserted] = merges_.try_emplace(key(left, right), Merge{rank, merged});
  if (!inserted && rank < it->second.rank) it->second = Merge{rank, merged};
}

void BpeEngine::merge(std::vector<int32_t>& ids) const {
  const size_t n = ids.size();
  if (n < 2) return;
  constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
  // ranks[i]: rank of merging ids[i] with ids[i+1] (kNone if not a merge). Short pieces (the
  // common case) are scanned linearly, like tiktoken: simpler and faster than a heap there.
  std::vector<uint32_t> ranks(n, kNone);
  std::vector<int32_t> merged(n, -1);
  auto lookup = [&](size_t i) {
    auto it = merges_.find(key(ids[i], ids[i + 1]));
    if (it == merges_.end()) {
      ranks[i] = kNone;
    } else {
      ranks[i] = it->second.rank;
      merged[i] = it->second.merged;
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) lookup(i);
  size_t len = n;
  while (len > 1) {
    uint32_t best = kNone;
    size_t at = 0;
    for (size_t i = 0; i + 1 < len; ++i)
      if (ranks[i] < best) {
        best = ranks[i];
        at = i;
      }
    if (best == kNone) break;
    ids[at] = merged[at];
    ids.erase(ids.begin() + at + 1);
    ranks.erase(ranks.begin() + at + 1);
    merged.erase(merged.begin() + at + 1);
    --len;
    ranks[len - 1] = kNone;
    if (at + 1 < len)
      lookup(at);
    else
      ranks[at] = kNone;
    if (at > 0) lookup(at - 1);
  }
}

}  // namespace lmforge
