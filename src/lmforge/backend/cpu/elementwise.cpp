// Residual adds, gradient accumulation and reductions.
#include <algorithm>
#include <type_traits>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/stochastic_round.h"

namespace lmforge::cpu {

template <typename T>
void add(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void add(float* out, const float* a, const uint16_t* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + bf16_to_fp32(b[i]);
}

template <typename T>
void accumulate(T* dst, const T* src, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

template <typename T>
void scale(T* x, T s, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

template <typename T>
void axpby(T* y, T a, const T* x, T b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = a * y[i] + b * x[i];
}

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for the kernels below.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace {
// Sum of squares of fp32 in fp64 (each square exact), fixed order. The block is read as four
// streams at once (its quarters, each with its own accumulators), each prefetched 2 KiB ahead: one
// stream per core leaves most of the memory bandwidth unused (17.8 GB/s on 2 Sapphire Rapids
// cores, 4 streams 24, prefetched 30). fp64 accumulators (as the GPU's and the AVX2 path's) make
// the sum independent of how a vector is cut to ~1e-16: a gradient norm summed per parameter (DDP)
// and per shard (full-shard, hybrid) gives the same clipping coefficient, which fp32 lanes' ~1e-8
// could round differently (seen: a hybrid run's moments 1 ulp from DDP's). On 124M elements, 2
// Zen 4 cores: 13.3-14.2 ms against 11.9-13.8 with fp32 lanes.
LMF_AVX512 double sum_squares_avx512(const float* x, int64_t n) {
  constexpr int64_t kAhead = 512;
  const int64_t q = n / 64 * 16;  // each quarter a multiple of 16
  const float* s[4] = {x, x + q, x + 2 * q, x + 3 * q};
  __m512d acc[4][2];
  for (auto& a : acc) a[0] = a[1] = _mm512_setzero_pd();
  for (int64_t i = 0; i < q; i += 16) {
    for (int k = 0; k < 4; ++k) {
      if (i + kAhead < q)
        _mm_prefetch(reinterpret_cast<const char*>(s[k] + i + kAhead), _MM_HINT_T0);
      const __m512 v = _mm512_loadu_ps(s[k] + i);
      const __m512d lo = lo_pd(v), hi = hi_pd(v);
      acc[k][0] = _mm512_fmadd_pd(lo, lo, acc[k][0]);
      acc[k][1] = _mm512_fmadd_pd(hi, hi, acc[k][1]);
    }
  }
  __m512d sum = _mm512_setzero_pd();
  for (const auto& a : acc) sum = _mm512_add_pd(sum, _mm512_add_pd(a[0], a[1]));
  double total = _mm512_reduce_add_pd(sum);
  for (int64_t i = 4 * q; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}

LMF_AVX2 double sum_squares_avx2(const float* x, int64_t n) {
  __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d lo = lo_pd256(v), hi = hi_pd256(v);
    a = _mm256_fmadd_pd(lo, lo, a);
    b = _mm256_fmadd_pd(hi, hi, b);
  }
  double acc = hsum256d(_mm256_add_pd(a, b));
  for (; i < n; ++i) acc += static_cast<double>(x[i]) * x[i];
  return acc;
}
}  // namespace
#pragma GCC diagnostic pop

template <typename T>
double sum_squares(const T* x, int64_t n) {
  // At most kMaxBlocks fixed blocks, summed in order: no allocation, and the same result for
  // any thread count.
  constexpr int64_t kMaxBlocks = 256;
  const int64_t block = std::max<int64_t>(1 << 12, (n + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t nb = (n + block - 1) / block;
  double partial[kMaxBlocks];
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * block, e = std::min(n, (b + 1) * block);
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        partial[b] = sum_squares_avx512(x + i0, e - i0);
        continue;
      }
      if (has_avx2()) {
        partial[b] = sum_squares_avx2(x + i0, e - i0);
        continue;
      }
    }
    double acc = 0;
    for (int64_t i = i0; i < e; ++i) acc += static_cast<double>(x[i]) * x[i];
    partial[b] = acc;
  }
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) total += partial[b];
  return total;
}

namespace {
constexpr int64_t kDropChunk = 1 << 14;  // a multiple of 16

LMF_AVX512 void dropout_forward_avx512(float* out, const float* x, const uint16_t* h, int64_t n,
                                       uint32_t cut, float scale, uint32_t key, uint32_t i0) {
  const __m512i vcut = _mm512_set1_epi32(static_cast<int>(cut));
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    // (bf16 widened with zero-masked ops: GCC 12 warns of load16's undefined sources here)
    const __m512 v =
        x ? load16(x + i, m)
          : _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
                m, _mm512_maskz_cvtepu16_epi32(m, _mm256_maskz_loadu_epi16(m, h + i)), 16));
    const __mmask16 keep =
        _mm512_cmpge_epu32_mask(sr_bits16(key, i0 + static_cast<uint32_t>(i)), vcut);
    store16(out + i, m, _mm512_maskz_mul_ps(keep, v, vs));
  }
}

LMF_AVX512 void dropout_backward_avx512(float* dinp, const float* g, int64_t n, uint32_t cut,
                                        float scale, uint32_t key, uint32_t i0) {
  const __m512i vcut = _mm512_set1_epi32(static_cast<int>(cut));
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __mmask16 keep =
        m & _mm512_cmpge_epu32_mask(sr_bits16(key, i0 + static_cast<uint32_t>(i)), vcut);
    const __m512 d = _mm512_maskz_loadu_ps(m, dinp + i);
    _mm512_mask_storeu_ps(dinp + i, keep,
                          _mm512_add_ps(d, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, g + i), vs)));
  }
}
}  // namespace

void dropout_forward(float* out, const float* x, const uint16_t* h, int64_t n, uint32_t cut,
                     float scale, uint32_t key) {
  static const bool avx512 = has_avx512();
#pragma omp parallel for schedule(static) if (n > kDropChunk)
  for (int64_t c = 0; c < n; c += kDropChunk) {
    const int64_t len = std::min(kDropChunk, n - c);
    if (avx512) {
      dropout_forward_avx512(out + c, x ? x + c : nullptr, h ? h + c : nullptr, len, cut, scale,
                             key, static_cast<uint32_t>(c));
      continue;
    }
    for (int64_t i = c; i < c + len; ++i) {
      const float v = x ? x[i] : bf16_to_fp32(h[i]);
      out[i] = sr_bits(key, static_cast<uint32_t>(i)) >= cut ? v * scale : 0.0f;
    }
  }
}

void dropout_backward(float* dinp, const float* g, int64_t n, uint32_t cut, float scale,
                      uint32_t key) {
  static const bool avx512 = has_avx512();
#pragma omp parallel for schedule(static) if (n > kDropChunk)
  for (int64_t c = 0; c < n; c += kDropChunk) {
    const int64_t len = std::min(kDropChunk, n - c);
    if (avx512) {
      dropout_backward_avx512(dinp + c, g + c, len, cut, scale, key, static_cast<uint32_t>(c));
      continue;
    }
    for (int64_t i = c; i < c + len; ++i)
      if (sr_bits(key, static_cast<uint32_t>(i)) >= cut) dinp[i] += g[i] * scale;
  }
}

#define LMF_INSTANTIATE(T)                               \
  template void add<T>(T*, const T*, const T*, int64_t); \
  template void accumulate<T>(T*, const T*, int64_t);    \
  template void scale<T>(T*, T, int64_t);                \
  template void axpby<T>(T*, T, const T*, T, int64_t);   \
  template double sum_squares<T>(const T*, int64_t);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu
