// PackedRange: the trained elements of a range [lo, hi) of ParamSet's flat space, one run of
// consecutive trained parameters after another, each run's start rounded up to `align` elements:
// how gradients are laid out (ParamSet's buffer, a rank's shard and a group's workspace under
// grad-/full-shard). Without frozen parameters the packed index of flat element i is i - lo;
// under LoRA only the adapters' elements take room (the frozen base weights have no gradient).
//
//   PackedRange shard(my_lo, my_hi, ps.trainable_ranges());
//   Tensor g = Tensor::zeros({shard.size()});
//   g.slice(shard.at(offset), numel);  // a trained parameter's piece in [my_lo, my_hi)
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "lmforge/core/error.h"

namespace lmforge {

class PackedRange {
 public:
  struct Run {
    int64_t lo, hi, at;  // flat [lo, hi) at packed index at
  };
  PackedRange() = default;
  // trained: sorted, disjoint flat ranges (ParamSet::trainable_ranges).
  PackedRange(int64_t lo, int64_t hi, const std::vector<std::pair<int64_t, int64_t>>& trained,
              int64_t align = 1)
      : lo_(lo), hi_(hi) {
    for (const auto& [a, z] : trained) {
      const int64_t s = std::max(a, lo), e = std::min(z, hi);
      if (s >= e) continue;
      const int64_t at = (size_ + align - 1) / align * align;
      runs_.push_back({s, e, at});
      size_ = at + (e - s);
    }
  }
  int64_t lo() const { return lo_; }
  int64_t hi() const { return hi_; }
  int64_t size() const { return size_; }  // packed elements (alignment gaps included)
  const std::vector<Run>& runs() const { return runs_; }
  // The packed index of a trained flat element of [lo, hi) (a run's elements are consecutive).
  int64_t at(int64_t flat) const {
    auto it = std::upper_bound(runs_.begin(), runs_.end(), flat,
                               [](int64_t f, const Run& r) { return f < r.lo; });
    LMF_CHECK(it != runs_.begin() && flat < (it - 1)->hi,
              "PackedRange: flat element {} is not a trained one of [{}, {})", flat, lo_, hi_);
    --it;
    return it->at + (flat - it->lo);
  }

 private:
  int64_t lo_ = 0, hi_ = 0, size_ = 0;
  std::vector<Run> runs_;
};

}  // namespace lmforge
