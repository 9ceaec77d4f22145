#include <cmath>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) {
  // Same operation order and fp32 rounding points as torch.optim.AdamW (foreach=False).
  // torch computes the scalars in Python double and casts them to fp32 at the kernel.
  const double b1 = beta1, b2 = beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const float bc2_sqrt =
      static_cast<float>(std::sqrt(1.0 - std::pow(b2, static_cast<double>(step))));
  const float step_size = static_cast<float>(lr / bc1);
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float w1 = static_cast<float>(1.0 - b1), w2 = static_cast<float>(1.0 - b2);
  const float fb2 = static_cast<float>(b2), feps = static_cast<float>(eps);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    float pi = p[i] * decay;
    m[i] += w1 * (gi - m[i]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
    v[i] = v[i] * fb2 + w2 * gi * gi;
    float denom = std::sqrt(v[i]) / bc2_sqrt + feps;
    p[i] = pi - step_size * (m[i] / denom);
  }
}

}  // namespace lmforge::cpu
