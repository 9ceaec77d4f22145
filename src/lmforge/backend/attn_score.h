// How attention turns q . k into the score its softmax sees: x = scale (q . k), scale =
// 1 / sqrt(scale_dim) with scale_dim the head size unless given (Gemma's query_pre_attn_scalar),
// then, with softcap > 0, x = softcap tanh(x / softcap) (Gemma 2's attention logit soft-capping),
// whose derivative 1 - tanh^2 backward multiplies into dS. The default is plain
// 1 / sqrt(head size) scaled dot-product attention.
#pragma once

#include <cmath>
#include <cstdint>

namespace lmforge {

struct AttnScore {
  int64_t scale_dim = 0;  // 0: the head size
  float softcap = 0;      // 0: none

  // 1 / sqrt(scale_dim or HS), computed in T (as the kernels always have).
  template <typename T>
  T scale(int64_t HS) const {
    return T(1) / std::sqrt(static_cast<T>(scale_dim > 0 ? scale_dim : HS));
  }
  bool plain(int64_t HS) const { return softcap == 0 && (scale_dim == 0 || scale_dim == HS); }
};

}  // namespace lmforge
