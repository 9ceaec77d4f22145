#include <immintrin.h>

#include <cmath>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/dtype.h"

namespace lmforge::cpu {

namespace {

// Same operation order and fp32 rounding points as torch.optim.AdamW (foreach=False); torch
// computes the scalars in Python double and casts them to fp32 at the kernel.
struct AdamScalars {
  float step_size, decay, w1, w2, b2, bc2_sqrt, eps, gscale;
};

inline float adam_one(float& p, float g, float& m, float& v, const AdamScalars& s) {
  g *= s.gscale;  // clipping; exact when 1
  float pi = p * s.decay;
  m += s.w1 * (g - m);  // torch: exp_avg.lerp_(grad, 1 - beta1)
  v = v * s.b2 + s.w2 * g * g;
  float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  p = pi - s.step_size * (m / denom);
  return p;
}

void adamw_portable(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n,
                    const AdamScalars& s) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = adam_one(p[i], g[i], m[i], v[i], s);
    if (p16) p16[i] = fp32_to_bf16_ftz(pi);
  }
}

// The same arithmetic, 16 lanes at a time (CPUs with AVX512-BF16) (separate multiplies and adds, no
// FMA: results are bit-identical to the portable loop), writing the bf16 copy of the weights in the
// same pass.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void adamw_avx512(
    float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, const AdamScalars& s) {
  const __m512 decay = _mm512_set1_ps(s.decay), w1 = _mm512_set1_ps(s.w1),
               w2 = _mm512_set1_ps(s.w2), b2 = _mm512_set1_ps(s.b2),
               bc2 = _mm512_set1_ps(s.bc2_sqrt), eps = _mm512_set1_ps(s.eps),
               lr = _mm512_set1_ps(s.step_size), gscale = _mm512_set1_ps(s.gscale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g + i), gscale), mi = _mm512_loadu_ps(m + i),
           vi = _mm512_loadu_ps(v + i);
    __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(p + i), decay);
    mi = _mm512_add_ps(mi, _mm512_mul_ps(w1, _mm512_sub_ps(gi, mi)));
    vi = _mm512_add_ps(_mm512_mul_ps(vi, b2), _mm512_mul_ps(_mm512_mul_ps(w2, gi), gi));
    __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
    pi = _mm512_sub_ps(pi, _mm512_mul_ps(lr, _mm512_div_ps(mi, denom)));
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    _mm512_storeu_ps(p + i, pi);
    if (p16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + i),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(pi)));
  }
  adamw_portable(p + i, g + i, m + i, v + i, p16 ? p16 + i : nullptr, n - i, s);
}

}  // namespace

void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  AdamScalars s;
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.step_size = static_cast<float>(lr / bc1);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.w2 = static_cast<float>(1.0 - beta2);
  s.b2 = static_cast<float>(beta2);
  s.eps = static_cast<float>(eps);
  s.gscale = static_cast<float>(grad_scale);
  static const bool avx512 = cpu_features().avx512_bf16;  // implies AVX-512 F/BW/VL
  constexpr int64_t kChunk = 1 << 14;  // a multiple of 16: chunks stay vector-aligned
#pragma omp parallel for schedule(static) if (n > kChunk)
  for (int64_t c = 0; c < n; c += kChunk) {
    int64_t len = std::min(kChunk, n - c);
    uint16_t* q = p16 ? p16 + c : nullptr;
    if (avx512)
      adamw_avx512(p + c, g + c, m + c, v + c, q, len, s);
    else
      adamw_portable(p + c, g + c, m + c, v + c, q, len, s);
  }
}

}  // namespace lmforge::cpu
