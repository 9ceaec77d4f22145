// The per-step scalars of an AdamW update, computed once on the host (in double, then rounded to
// fp32 as torch.optim.AdamW's kernels receive them) and shared by every backend's kernel, so the
// CPU and CUDA updates are bit-identical.
#pragma once

#include <cmath>
#include <cstdint>

namespace lmforge {

struct AdamScalars {
  float step_size, decay, w1, w2, b2, bc2_sqrt, eps, gscale;
};

inline AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps,
                                double weight_decay, int64_t step, double grad_scale) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamScalars s;
  s.step_size = static_cast<float>(lr / bc1);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.w2 = static_cast<float>(1.0 - beta2);
  s.b2 = static_cast<float>(beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.gscale = static_cast<float>(grad_scale);
  return s;
}

}  // namespace lmforge
