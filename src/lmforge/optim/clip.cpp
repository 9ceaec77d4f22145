#include "lmforge/optim/clip.h"

#include <algorithm>
#include <cmath>

#include "lmforge/backend/ops.h"

namespace lmforge {

double grad_norm(const ParamSet& params) {
  // On a GPU, one reduction over the flat buffer (its alignment gaps are zero) reads back one
  // number instead of one per parameter.
  if (params.device() != Device::kCPU) return std::sqrt(ops::sum_squares(params.flat_grads()));
  double ss = 0;
  for (const Param& p : params.params())
    if (!p.frozen) ss += ops::sum_squares(p.grad);  // (a frozen one's stays zero)
  return std::sqrt(ss);
}

double clip_coef(double norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(norm)) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

}  // namespace lmforge
