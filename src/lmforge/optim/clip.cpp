#include "lmforge/optim/clip.h"

#include <cmath>

#include "lmforge/backend/ops.h"

namespace lmforge {

double grad_norm(const ParamSet& params) {
  // On a GPU, one reduction over the flat buffer (its alignment gaps are zero) reads back one
  // number instead of one per parameter.
  if (params.device() != Device::kCPU) return std::sqrt(ops::sum_squares(params.flat_grads()));
  double ss = 0;
  for (const Param& p : params.params()) ss += ops::sum_squares(p.grad);
  return std::sqrt(ss);
}

double clip_grad_norm(ParamSet& params, double max_norm) {
  double norm = grad_norm(params);
  if (max_norm > 0 && std::isfinite(norm)) {
    double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0)
      for (Param& p : params.params()) ops::scale(p.grad, coef);
  }
  return norm;
}

}  // namespace lmforge
