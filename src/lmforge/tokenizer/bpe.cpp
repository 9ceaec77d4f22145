#include "lmforge/tokenizer/bpe.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <queue>

namespace lmforge {

void BpeEngine::add_merge(int32_t left, int32_t right, int32_t merged, uint32_t rank,
                          bool last_wins) {
  auto [it, inserted] = merges_.try_emplace(key(left, right), Merge{rank, merged});
  if (!inserted && (last_wins || rank < it->second.rank)) it->second = Merge{rank, merged};
}

std::vector<BpeEngine::Rule> BpeEngine::rules() const {
  std::vector<Rule> out;
  out.reserve(merges_.size());
  for (auto& [k, m] : merges_)
    out.push_back(
        {static_cast<int32_t>(k >> 32), static_cast<int32_t>(k & 0xFFFFFFFFu), m.merged, m.rank});
  std::sort(out.begin(), out.end(), [](const Rule& a, const Rule& b) {
    if (a.rank != b.rank) return a.rank < b.rank;
    return a.left != b.left ? a.left < b.left : a.right < b.right;
  });
  return out;
}

void BpeEngine::merge(std::vector<int32_t>& ids) const {
  const size_t n = ids.size();
  if (n < 2) return;
  if (n > kLinearMax) return merge_long(ids);
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

// The same order (lowest rank, then leftmost) in O(n log n): symbols in a linked list, candidate
// pairs in a min-heap keyed by (rank, position of the left symbol). Positions never reorder, so
// "leftmost" is the lowest original position. An entry is stale once either symbol has changed;
// it is then skipped (symbols only grow, so a changed pair never comes back).
void BpeEngine::merge_long(std::vector<int32_t>& ids) const {
  const uint32_t n = static_cast<uint32_t>(ids.size());
  constexpr uint32_t kEnd = std::numeric_limits<uint32_t>::max();
  struct Candidate {
    uint32_t rank, pos;
    int32_t left, right, merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::vector<uint32_t> next(n), prev(n);
  std::vector<bool> gone(n, false);
  for (uint32_t i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : kEnd;
    prev[i] = i > 0 ? i - 1 : kEnd;
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push = [&](uint32_t i) {
    if (i == kEnd || next[i] == kEnd) return;
    auto it = merges_.find(key(ids[i], ids[next[i]]));
    if (it != merges_.end())
      heap.push({it->second.rank, i, ids[i], ids[next[i]], it->second.merged});
  };
  for (uint32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    Candidate c = heap.top();
    heap.pop();
    uint32_t j = next[c.pos];
    if (gone[c.pos] || j == kEnd || ids[c.pos] != c.left || ids[j] != c.right) continue;
    ids[c.pos] = c.merged;
    gone[j] = true;
    next[c.pos] = next[j];
    if (next[j] != kEnd) prev[next[j]] = c.pos;
    push(prev[c.pos]);
    push(c.pos);
  }
  size_t out = 0;
  for (uint32_t i = 0; i < n; ++i)
    if (!gone[i]) ids[out++] = ids[i];
  ids.resize(out);
}

}  // namespace lmforge
