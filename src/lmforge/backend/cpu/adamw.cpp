#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "lmforge/backend/adamw_scalars.h"
#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/stochastic_round.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands
// (_mm512_undefined_*) as maybe-uninitialized once the kernels are inlined into the OpenMP
// regions: off for this file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lmforge::cpu {

namespace {

// torch.optim.AdamW's (foreach=False) operations and fp32 rounding points, with the bias
// correction of the denominator folded into the scalars (adam_scalars: one division fewer).
inline float adam_one(float& p, float g, float& m, float& v, const AdamScalars& s) {
  g *= s.gscale;  // clipping; exact when 1
  float pi = p * s.decay;
  m += s.w1 * (g - m);  // torch: exp_avg.lerp_(grad, 1 - beta1)
  v = v * s.b2 + s.w2 * g * g;
  float denom = std::sqrt(v) + s.eps;
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

// adam_one on 16 lanes: the scalars broadcast once; step() loads g, m, v at i, stores m and v, and
// returns the new weights from the old ones (separate multiplies and adds, no FMA: bit-identical
// to adam_one).
struct AdamLanes {
  __m512 decay, w1, w2, b2, eps, lr, gscale;
  __attribute__((target("avx512f"))) explicit AdamLanes(const AdamScalars& s)
      : decay(_mm512_set1_ps(s.decay)),
        w1(_mm512_set1_ps(s.w1)),
        w2(_mm512_set1_ps(s.w2)),
        b2(_mm512_set1_ps(s.b2)),
        eps(_mm512_set1_ps(s.eps)),
        lr(_mm512_set1_ps(s.step_size)),
        gscale(_mm512_set1_ps(s.gscale)) {}
  __attribute__((target("avx512f"))) __m512 step(__m512 p, const float* g, float* m,
                                                 float* v) const {
    __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g), gscale), mi = _mm512_loadu_ps(m),
           vi = _mm512_loadu_ps(v);
    __m512 pi = _mm512_mul_ps(p, decay);
    mi = _mm512_add_ps(mi, _mm512_mul_ps(w1, _mm512_sub_ps(gi, mi)));
    vi = _mm512_add_ps(_mm512_mul_ps(vi, b2), _mm512_mul_ps(_mm512_mul_ps(w2, gi), gi));
    __m512 denom = _mm512_add_ps(_mm512_sqrt_ps(vi), eps);
    _mm512_storeu_ps(m, mi);
    _mm512_storeu_ps(v, vi);
    return _mm512_sub_ps(pi, _mm512_mul_ps(lr, _mm512_div_ps(mi, denom)));
  }
};

// 16 lanes at a time (CPUs with AVX512-BF16), writing the bf16 copy of the weights in the same
// pass; bit-identical to the portable loop. The copy is only written, so (aligned) it goes out with
// streaming stores: no read of its old lines (1/15 of the pass's memory traffic).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void adamw_avx512(
    float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, const AdamScalars& s) {
  const AdamLanes lanes(s);
  const bool stream = (reinterpret_cast<uintptr_t>(p16) & 31) == 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 pi = lanes.step(_mm512_loadu_ps(p + i), g + i, m + i, v + i);
    _mm512_storeu_ps(p + i, pi);
    if (!p16) continue;
    const auto h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(pi));
    if (stream)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p16 + i), h);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + i), h);
  }
  if (p16 && stream) _mm_sfence();  // the streamed stores ordered before anyone reads them
  adamw_portable(p + i, g + i, m + i, v + i, p16 ? p16 + i : nullptr, n - i, s);
}

// adam_one on 8 lanes (AVX2): the same separate multiplies and adds, bit-identical to the
// portable loop; the bf16 copy rounded per element as there.
__attribute__((target("avx2"))) void adamw_avx2(float* p, const float* g, float* m, float* v,
                                                uint16_t* p16, int64_t n, const AdamScalars& s) {
  const __m256 decay = _mm256_set1_ps(s.decay), w1 = _mm256_set1_ps(s.w1),
               w2 = _mm256_set1_ps(s.w2), b2 = _mm256_set1_ps(s.b2), eps = _mm256_set1_ps(s.eps),
               lr = _mm256_set1_ps(s.step_size), gscale = _mm256_set1_ps(s.gscale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), gscale);
    __m256 mi = _mm256_loadu_ps(m + i), vi = _mm256_loadu_ps(v + i);
    const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
    mi = _mm256_add_ps(mi, _mm256_mul_ps(w1, _mm256_sub_ps(gi, mi)));
    vi = _mm256_add_ps(_mm256_mul_ps(vi, b2), _mm256_mul_ps(_mm256_mul_ps(w2, gi), gi));
    const __m256 denom = _mm256_add_ps(_mm256_sqrt_ps(vi), eps);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    _mm256_storeu_ps(p + i, _mm256_sub_ps(pi, _mm256_mul_ps(lr, _mm256_div_ps(mi, denom))));
    if (p16)
      for (int k = 0; k < 8; ++k) p16[i + k] = fp32_to_bf16_ftz(p[i + k]);
  }
  adamw_portable(p + i, g + i, m + i, v + i, p16 ? p16 + i : nullptr, n - i, s);
}

// bf16 master weights: the same update on bf16(p) widened exactly, written back stochastically
// rounded with the bits of element index0 + i (core/stochastic_round.h).
void adamw_sr_portable(uint16_t* p, const float* g, float* m, float* v, int64_t n,
                       const AdamScalars& s, uint32_t key, uint32_t index0) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = bf16_to_fp32(p[i]);
    adam_one(pi, g[i], m[i], v[i], s);
    p[i] = bf16_round_stochastic(pi, sr_bits(key, index0 + static_cast<uint32_t>(i)));
  }
}

LMF_AVX512 void adamw_sr_avx512(uint16_t* p, const float* g, float* m, float* v, int64_t n,
                                const AdamScalars& s, uint32_t key, uint32_t index0) {
  const AdamLanes adam(s);
  const __m512i low16 = _mm512_set1_epi32(0xffff), abs_mask = _mm512_set1_epi32(0x7fffffff),
                exp_mask = _mm512_set1_epi32(0x7f800000), quiet = _mm512_set1_epi32(0x40 << 16);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m512 pi = adam.step(
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), g + i, m + i, v + i);
    // bf16_round_stochastic, lanewise: finite values get the random offset, NaN its quiet bit,
    // inf nothing.
    const __m512i bits = sr_bits16(key, index0 + static_cast<uint32_t>(i));
    const __m512i u = _mm512_castps_si512(pi);
    const __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, exp_mask), exp_mask);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), exp_mask);
    __m512i r = _mm512_mask_add_epi32(u, finite, u, _mm512_and_si512(bits, low16));
    r = _mm512_mask_or_epi32(r, nan, r, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
  adamw_sr_portable(p + i, g + i, m + i, v + i, n - i, s, key, index0 + static_cast<uint32_t>(i));
}

}  // namespace

constexpr int64_t kAdamChunk = 1 << 14;  // a multiple of 16: chunks stay vector-aligned

void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale) {
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  static const bool avx512 = cpu_features().avx512_bf16;  // implies AVX-512 F/BW/VL
  static const bool avx2 = has_avx2();
#pragma omp parallel for schedule(static) if (n > kAdamChunk)
  for (int64_t c = 0; c < n; c += kAdamChunk) {
    int64_t len = std::min(kAdamChunk, n - c);
    uint16_t* q = p16 ? p16 + c : nullptr;
    if (avx512)
      adamw_avx512(p + c, g + c, m + c, v + c, q, len, s);
    else if (avx2)
      adamw_avx2(p + c, g + c, m + c, v + c, q, len, s);
    else
      adamw_portable(p + c, g + c, m + c, v + c, q, len, s);
  }
}

void adamw_update_sr(uint16_t* p, const float* g, float* m, float* v, int64_t n, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     double grad_scale, uint32_t key, uint32_t index0) {
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  static const bool avx512 = has_avx512();
#pragma omp parallel for schedule(static) if (n > kAdamChunk)
  for (int64_t c = 0; c < n; c += kAdamChunk) {
    const int64_t len = std::min(kAdamChunk, n - c);
    const uint32_t i0 = index0 + static_cast<uint32_t>(c);
    if (avx512)
      adamw_sr_avx512(p + c, g + c, m + c, v + c, len, s, key, i0);
    else
      adamw_sr_portable(p + c, g + c, m + c, v + c, len, s, key, i0);
  }
}

#pragma GCC diagnostic pop

}  // namespace lmforge::cpu
