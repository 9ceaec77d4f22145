#include "lmforge/models/rope_table.h"

#include <cmath>

namespace lmforge {

std::vector<double> rope_inv_freq(const ModelConfig& cfg, bool local) {
  int64_t HS = cfg.head_size(), half = HS / 2;
  std::vector<double> inv(half);
  const double theta = local ? cfg.rope_local_theta : cfg.rope_theta;
  for (int64_t i = 0; i < half; ++i) inv[i] = 1.0 / std::pow(theta, 2.0 * i / HS);
  const RopeScaling& s = cfg.rope_scaling;
  if (s.factor > 0 && !local && s.type == "linear") {
    for (double& f : inv) f /= s.factor;
  } else if (s.factor > 0 && !local) {
    double old_len = static_cast<double>(s.original_max_position_embeddings);
    double low_wavelen = old_len / s.low_freq_factor;
    double high_wavelen = old_len / s.high_freq_factor;
    for (double& f : inv) {
      double wavelen = 2 * M_PI / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f /= s.factor;
      } else {
        double smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }
    }
  }
  return inv;
}

void rope_tables(const ModelConfig& cfg, const Tensor& cos, const Tensor& sin, bool local) {
  std::vector<double> inv = rope_inv_freq(cfg, local);
  int64_t half = static_cast<int64_t>(inv.size()), n = cos.numel() / half;
  float* c = cos.data<float>();
  float* s = sin.data<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < half; ++i) {
      double a = static_cast<double>(t) * inv[i];
      c[t * half + i] = static_cast<float>(std::cos(a));
      s[t * half + i] = static_cast<float>(std::sin(a));
    }
}

}  // namespace lmforge
