// AVX-512 and AVX2 building blocks for the fp32 kernels: a vectorized exp and the functions built
// on it. Every function here is compiled for its ISA by its target attribute (the rest of the
// binary stays x86-64-v2) and may only be called after checking has_avx512() / has_avx2(), from
// functions carrying the same LMF_AVX512 / LMF_AVX2 attribute.
//
//   if (has_avx512()) gelu_forward_avx512(out, inp, n);
//   else if (has_avx2()) gelu_forward_avx2(out, inp, n);
//   else portable loop
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "lmforge/core/cpu_features.h"

#define LMF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define LMF_AVX2 __attribute__((target("avx2,fma")))
// AVX-512 with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4): kernels that load and store bf16;
// callable after has_avx512_bf16().
#define LMF_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace lmforge::cpu {

inline bool has_avx512() {
  const CpuFeatures& f = cpu_features();
  static const bool on = f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  return on;
}

inline bool has_avx512_bf16() {
  static const bool on = has_avx512() && cpu_features().avx512_bf16;
  return on;
}

// Cephes' expf polynomial in r (highest degree first), shared by exp512 and exp256.
inline constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                      4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// e^x for fp32 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial),
// within 2 ulp of the correctly rounded result; x < -87.3 gives 0 (no denormals), x > 88.7 +inf.
LMF_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.7228391f), lo = _mm512_set1_ps(-87.3365448f);
  __m512 over = x;
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[k]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 e = _mm512_scalef_ps(p, n);
  e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(over, lo, _CMP_LT_OQ), e, _mm512_setzero_ps());
  e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(over, hi, _CMP_GT_OQ), e,
                           _mm512_set1_ps(__builtin_inff()));
  // NaN in, NaN out (min/max above would have replaced it).
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(over, over, _CMP_UNORD_Q), e, over);
}

// tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits at +-inf, absolute error ~1e-7 near 0.
LMF_AVX512 inline __m512 tanh512(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = exp512(_mm512_add_ps(u, u));
  return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
}

// 1 / (1 + e^{-x})
LMF_AVX512 inline __m512 sigmoid512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// core/stochastic_round.h's hash32 and sr_bits(key, index0 + lane) on 16 lanes.
LMF_AVX512 inline __m512i hash32_avx512(__m512i x) {
  // (the zero-masked shifts: GCC 12 warns of the unmasked ones' undefined source once inlined)
  const __mmask16 all = 0xffff;
  x = _mm512_xor_si512(x, _mm512_maskz_srli_epi32(all, x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_maskz_srli_epi32(all, x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_maskz_srli_epi32(all, x, 16));
}
LMF_AVX512 inline __m512i sr_bits16(uint32_t key, uint32_t index0) {
  const __m512i idx =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(index0)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return hash32_avx512(
      _mm512_xor_si512(_mm512_mullo_epi32(idx, _mm512_set1_epi32(static_cast<int>(0x9e3779b9u))),
                       _mm512_set1_epi32(static_cast<int>(key))));
}

// The mask of the first min(n, 16) lanes: all 16 in the body of a loop, the tail at its end.
LMF_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 fp32 lanes from fp32 or bf16 memory (widened exactly), the first min(n, 16) of them; and
// back, a bf16 store rounding to nearest even as to_bf16 does.
LMF_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LMF_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// All 16 lanes, unmasked: in a kernel's main loop (GCC 12 keeps an array of accumulators fed by
// masked loads in memory as well, a store of each per iteration).
LMF_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LMF_AVX512 inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
LMF_AVX512 inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
LMF_AVX512_BF16 inline void store16(uint16_t* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
// What a gradient kernel adds to: the fp32 gradient it accumulates into, or zeros for a bf16 one
// it writes.
LMF_AVX512 inline __m512 prior16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
LMF_AVX512 inline __m512 prior16(const uint16_t*, __mmask16) { return _mm512_setzero_ps(); }

// The low and high 8 lanes of an fp32 vector widened to double.
LMF_AVX512 inline __m512d lo_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
LMF_AVX512 inline __m512d hi_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// AVX2 with FMA (Haswell, Zen 1-3 and later): CPUs without AVX-512, where the kernels would
// otherwise run scalar.
inline bool has_avx2() {
  static const bool on = cpu_features().avx2;
  return on;
}

// exp512 on 8 lanes: the same reduction and polynomial; 2^n applied in two steps (n = n1 + n2,
// each a normal power of two) since AVX2 has no scalef.
LMF_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228391f), lo = _mm256_set1_ps(-87.3365448f);
  const __m256 over = x;
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[k]));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);  // in [-126, 128]
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 e = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(over, lo, _CMP_LT_OQ));
  e = _mm256_blendv_ps(e, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(over, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(e, over, _mm256_cmp_ps(over, over, _CMP_UNORD_Q));  // NaN stays NaN
}

LMF_AVX2 inline __m256 tanh256(__m256 u) {  // as tanh512
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp256(_mm256_add_ps(u, u));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
}

LMF_AVX2 inline __m256 sigmoid256(__m256 x) {  // as sigmoid512
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// The sum of 4 double lanes, and the lanes of an fp32 vector widened to double.
LMF_AVX2 inline double hsum256d(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
LMF_AVX2 inline __m256d lo_pd256(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
LMF_AVX2 inline __m256d hi_pd256(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

}  // namespace lmforge::cpu
