// LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the last dimension.
// Row statistics accumulate in double. Weight/bias gradients are column sums over rows, split
// by column so they are deterministic whatever the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for this file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lmforge::cpu {

namespace {
constexpr int64_t kCols = 64;  // columns per task in the weight-gradient sums
}

namespace {
// Half h of 16 floats widened to doubles (0: lanes 0-7, 1: lanes 8-15).
LMF_AVX512 inline __m512d half_pd(__m512 v, int h) { return h ? hi_pd(v) : lo_pd(v); }
// The two halves rounded to fp32, as one vector of 16.
LMF_AVX512 inline __m512 join_ps(__m512d lo, __m512d hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
}
// d[0, 16) += join_ps(lo, hi) in lanes k: the row kernels' dinp update.
LMF_AVX512 inline void add_halves(float* d, __mmask16 k, __m512d lo, __m512d hi) {
  _mm512_mask_storeu_ps(d, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, d), join_ps(lo, hi)));
}

// One row of layernorm_forward in fp32 with AVX-512: the same double arithmetic on 8 lanes (the
// row sums in lanes, then across them), the output's fp32 multiply and add as the scalar loop's.
LMF_AVX512 void layernorm_forward_row_avx512(float* o, float* mean, float* rstd, const float* x,
                                             const float* w, const float* b, int64_t C,
                                             double eps) {
  __m512d acc = _mm512_setzero_pd();
  for (int64_t c = 0; c < C; c += 16) {
    const __m512 xv = _mm512_maskz_loadu_ps(lanes(C - c), x + c);  // masked lanes are 0
    acc = _mm512_add_pd(acc, _mm512_add_pd(lo_pd(xv), hi_pd(xv)));
  }
  const double mu = _mm512_reduce_add_pd(acc) / static_cast<double>(C);
  const __m512d m = _mm512_set1_pd(mu);
  acc = _mm512_setzero_pd();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c);
    const __m512d a = _mm512_maskz_sub_pd(static_cast<__mmask8>(k), lo_pd(xv), m),
                  z = _mm512_maskz_sub_pd(static_cast<__mmask8>(k >> 8), hi_pd(xv), m);
    acc = _mm512_fmadd_pd(a, a, _mm512_fmadd_pd(z, z, acc));
  }
  const double sd = 1.0 / std::sqrt(_mm512_reduce_add_pd(acc) / static_cast<double>(C) + eps);
  const __m512d s = _mm512_set1_pd(sd);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c);
    __m512 y = _mm512_mul_ps(join_ps(_mm512_mul_pd(_mm512_sub_pd(lo_pd(xv), m), s),
                                     _mm512_mul_pd(_mm512_sub_pd(hi_pd(xv), m), s)),
                             _mm512_maskz_loadu_ps(k, w + c));
    if (b) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(k, b + c));
    _mm512_mask_storeu_ps(o + c, k, y);
  }
  *mean = static_cast<float>(mu);
  *rstd = static_cast<float>(sd);
}

// One row of layernorm_backward's dinp in fp32 with AVX-512: the same double arithmetic on 8 lanes
// (the two row sums in lanes, then across them).
LMF_AVX512 void layernorm_backward_row_avx512(float* d, const float* x, const float* g,
                                              const float* w, double mean, double rstd, int64_t C) {
  const __m512d m = _mm512_set1_pd(mean), s = _mm512_set1_pd(rstd);
  __m512d sdn = _mm512_setzero_pd(), sdnn = _mm512_setzero_pd();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);  // masked lanes load zeros: dn = 0 adds nothing
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c), gv = _mm512_maskz_loadu_ps(k, g + c),
                 wv = _mm512_maskz_loadu_ps(k, w + c);
    for (int h = 0; h < 2; ++h) {
      const __m512d n = _mm512_mul_pd(_mm512_sub_pd(half_pd(xv, h), m), s);
      const __m512d dn = _mm512_mul_pd(half_pd(wv, h), half_pd(gv, h));
      sdn = _mm512_add_pd(sdn, dn);
      sdnn = _mm512_fmadd_pd(dn, n, sdnn);
    }
  }
  const __m512d dnm = _mm512_set1_pd(_mm512_reduce_add_pd(sdn) / static_cast<double>(C)),
                dnnm = _mm512_set1_pd(_mm512_reduce_add_pd(sdnn) / static_cast<double>(C));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c), gv = _mm512_maskz_loadu_ps(k, g + c),
                 wv = _mm512_maskz_loadu_ps(k, w + c);
    __m512d r[2];
    for (int h = 0; h < 2; ++h) {
      const __m512d n = _mm512_mul_pd(_mm512_sub_pd(half_pd(xv, h), m), s);
      const __m512d dn = _mm512_mul_pd(half_pd(wv, h), half_pd(gv, h));
      // (dn - dnorm_mean - n * dnorm_norm_mean) * rstd
      r[h] = _mm512_mul_pd(_mm512_sub_pd(_mm512_sub_pd(dn, dnm), _mm512_mul_pd(n, dnnm)), s);
    }
    add_halves(d + c, k, r[0], r[1]);
  }
}

// One row of rmsnorm_forward / rmsnorm_backward's dinp in fp32 with AVX-512: the scalar loops'
// double arithmetic on 8 lanes (row sums in lanes, then across them).
LMF_AVX512 void rmsnorm_forward_row_avx512(float* o, float* rstd, const float* x, const float* w,
                                           int64_t C, double eps, float offset) {
  const __m512 off = _mm512_set1_ps(offset);
  __m512d acc = _mm512_setzero_pd();
  for (int64_t c = 0; c < C; c += 16) {
    const __m512 xv = _mm512_maskz_loadu_ps(lanes(C - c), x + c);  // masked lanes are 0
    const __m512d lo = lo_pd(xv), hi = hi_pd(xv);
    acc = _mm512_add_pd(acc, _mm512_add_pd(_mm512_mul_pd(lo, lo), _mm512_mul_pd(hi, hi)));
  }
  const double sd = 1.0 / std::sqrt(_mm512_reduce_add_pd(acc) / static_cast<double>(C) + eps);
  const __m512d s = _mm512_set1_pd(sd);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c);
    _mm512_mask_storeu_ps(
        o + c, k,
        _mm512_mul_ps(join_ps(_mm512_mul_pd(lo_pd(xv), s), _mm512_mul_pd(hi_pd(xv), s)),
                      _mm512_add_ps(_mm512_maskz_loadu_ps(k, w + c), off)));
  }
  *rstd = static_cast<float>(sd);
}

LMF_AVX512 void rmsnorm_backward_row_avx512(float* d, const float* x, const float* g,
                                            const float* w, double rstd, int64_t C, float offset) {
  const __m512 off = _mm512_set1_ps(offset);  // (masked lanes: g is 0 there)
  const __m512d s = _mm512_set1_pd(rstd);
  __m512d acc = _mm512_setzero_pd();  // sum of dn * n, dn = w g, n = x rstd
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);  // masked lanes add zeros
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c), gv = _mm512_maskz_loadu_ps(k, g + c),
                 wv = _mm512_add_ps(_mm512_maskz_loadu_ps(k, w + c), off);
    for (int h = 0; h < 2; ++h) {
      const __m512d dn = _mm512_mul_pd(half_pd(wv, h), half_pd(gv, h));
      acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_mul_pd(dn, half_pd(xv, h)), s));
    }
  }
  const __m512d dot = _mm512_set1_pd(_mm512_reduce_add_pd(acc) / static_cast<double>(C));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + c), gv = _mm512_maskz_loadu_ps(k, g + c),
                 wv = _mm512_add_ps(_mm512_maskz_loadu_ps(k, w + c), off);
    __m512d r[2];
    for (int h = 0; h < 2; ++h) {
      const __m512d dn = _mm512_mul_pd(half_pd(wv, h), half_pd(gv, h));
      const __m512d n = _mm512_mul_pd(half_pd(xv, h), s);
      r[h] = _mm512_mul_pd(s, _mm512_sub_pd(dn, _mm512_mul_pd(n, dot)));
    }
    add_halves(d + c, k, r[0], r[1]);
  }
}

// The norms' weight (and LayerNorm's bias) gradients of one block of nc <= kCols (64) columns,
// summed over the rows in order in double: dw[j] = sum_i ((x - mean) rstd) g, db[j] = sum_i g
// (RMSNorm: mean null, i.e. (x rstd) g; db null). x and g point at the block's first column of
// row 0; row i at row_offset(i, C, group, stride). The scalar loops' arithmetic, on 8 lanes (x - 0
// is x exactly).
LMF_AVX512 void norm_param_grads_avx512(double* dw, double* db, const float* x, const float* g,
                                        const float* mean, const float* rstd, int64_t N, int64_t C,
                                        int64_t nc, int64_t group, int64_t stride) {
  static_assert(kCols == 64);
  __m512d aw[8], ab[8];
  for (int k = 0; k < 8; ++k) aw[k] = ab[k] = _mm512_setzero_pd();
  const int quads = static_cast<int>((nc + 15) / 16);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t at = row_offset(i, C, group, stride);
    const __m512d m = _mm512_set1_pd(mean ? mean[i] : 0.0), s = _mm512_set1_pd(rstd[i]);
    for (int q = 0; q < quads; ++q) {
      const __mmask16 k = lanes(nc - 16 * q);  // masked lanes add zeros
      const __m512 xv = _mm512_maskz_loadu_ps(k, x + at + 16 * q),
                   gv = _mm512_maskz_loadu_ps(k, g + at + 16 * q);
      for (int h = 0; h < 2; ++h) {
        const __m512d xd = half_pd(xv, h), gd = half_pd(gv, h);
        const __m512d n = _mm512_mul_pd(_mm512_sub_pd(xd, m), s);
        aw[2 * q + h] = _mm512_add_pd(aw[2 * q + h], _mm512_mul_pd(n, gd));
        if (db) ab[2 * q + h] = _mm512_add_pd(ab[2 * q + h], gd);
      }
    }
  }
  double w[64], b[64];
  for (int k = 0; k < 8; ++k) {
    _mm512_storeu_pd(w + 8 * k, aw[k]);
    _mm512_storeu_pd(b + 8 * k, ab[k]);
  }
  for (int64_t j = 0; j < nc; ++j) {
    dw[j] = w[j];
    if (db) db[j] = b[j];
  }
}
}  // namespace

template <typename T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* weight, const T* bias,
                       int64_t N, int64_t C, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        layernorm_forward_row_avx512(out + i * C, mean + i, rstd + i, inp + i * C, weight, bias, C,
                                     eps);
        continue;
      }
    }
    const T* x = inp + i * C;
    double m = 0;
    for (int64_t c = 0; c < C; ++c) m += x[c];
    m /= C;
    double var = 0;
    for (int64_t c = 0; c < C; ++c) var += (x[c] - m) * (x[c] - m);
    var /= C;
    double s = 1.0 / std::sqrt(var + eps);
    T* o = out + i * C;
    for (int64_t c = 0; c < C; ++c)
      o[c] = static_cast<T>((x[c] - m) * s) * weight[c] + (bias ? bias[c] : T(0));
    mean[i] = static_cast<T>(m);
    rstd[i] = static_cast<T>(s);
  }
}

template <typename T>
void layernorm_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                        const T* mean, const T* rstd, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        layernorm_backward_row_avx512(dinp + i * C, inp + i * C, dout + i * C, weight, mean[i],
                                      rstd[i], C);
        continue;
      }
    }
    const T* x = inp + i * C;
    const T* g = dout + i * C;
    double m = mean[i], s = rstd[i];
    double dnorm_mean = 0, dnorm_norm_mean = 0;
    for (int64_t c = 0; c < C; ++c) {
      double n = (x[c] - m) * s;
      double dn = static_cast<double>(weight[c]) * g[c];
      dnorm_mean += dn;
      dnorm_norm_mean += dn * n;
    }
    dnorm_mean /= C;
    dnorm_norm_mean /= C;
    T* d = dinp + i * C;
    for (int64_t c = 0; c < C; ++c) {
      double n = (x[c] - m) * s;
      double dn = static_cast<double>(weight[c]) * g[c];
      d[c] += static_cast<T>((dn - dnorm_mean - n * dnorm_norm_mean) * s);
    }
  }
  // Column sums in blocks of kCols columns: each column is summed in row order by one thread
  // (deterministic), and the row walk stays within cache lines. No dweight: no parameter
  // gradients (frozen).
  if (!dweight) return;
  const int64_t blocks = (C + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kCols, nc = std::min(kCols, C - c0);
    double dw[kCols] = {}, db[kCols] = {};
    bool summed = false;
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        norm_param_grads_avx512(dw, db, inp + c0, dout + c0, mean, rstd, N, C, nc, 1, C);
        summed = true;
      }
    }
    for (int64_t i = 0; i < N && !summed; ++i) {
      const double m = mean[i], s = rstd[i];
      const T* x = inp + i * C + c0;
      const T* g = dout + i * C + c0;
      for (int64_t j = 0; j < nc; ++j) {
        dw[j] += (x[j] - m) * s * g[j];
        db[j] += g[j];
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      dweight[c0 + j] += static_cast<T>(dw[j]);
      if (dbias) dbias[c0 + j] += static_cast<T>(db[j]);
    }
  }
}

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t N, int64_t C,
                     double eps, int64_t group, int64_t stride, double offset) {
  const T off = static_cast<T>(offset);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t at = row_offset(i, C, group, stride);
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        rmsnorm_forward_row_avx512(out + at, rstd + i, inp + at, weight, C, eps, off);
        continue;
      }
    }
    const T* x = inp + at;
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
    double s = 1.0 / std::sqrt(ss / C + eps);
    T* o = out + at;
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(x[c] * s) * (weight[c] + off);
    rstd[i] = static_cast<T>(s);
  }
}

template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int64_t N, int64_t C, int64_t group, int64_t stride,
                      double offset) {
  const T off = static_cast<T>(offset);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t at = row_offset(i, C, group, stride);
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        rmsnorm_backward_row_avx512(dinp + at, inp + at, dout + at, weight, rstd[i], C, off);
        continue;
      }
    }
    const T* x = inp + at;
    const T* g = dout + at;
    double s = rstd[i];
    double dot = 0;  // mean(dn * n)
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(weight[c] + off) * g[c] * x[c] * s;
    dot /= C;
    T* d = dinp + at;
    for (int64_t c = 0; c < C; ++c) {
      double n = x[c] * s;
      d[c] += static_cast<T>(s * (static_cast<double>(weight[c] + off) * g[c] - n * dot));
    }
  }
  if (!dweight) return;  // frozen
  const int64_t blocks = (C + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kCols, nc = std::min(kCols, C - c0);
    double dw[kCols] = {};
    bool summed = false;
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        norm_param_grads_avx512(dw, nullptr, inp + c0, dout + c0, nullptr, rstd, N, C, nc, group,
                                stride);
        summed = true;
      }
    }
    for (int64_t i = 0; i < N && !summed; ++i) {
      const int64_t at = row_offset(i, C, group, stride) + c0;
      const double s = rstd[i];
      for (int64_t j = 0; j < nc; ++j) dw[j] += static_cast<double>(inp[at + j]) * s * dout[at + j];
    }
    for (int64_t j = 0; j < nc; ++j) dweight[c0 + j] += static_cast<T>(dw[j]);
  }
}

#define LMF_INSTANTIATE(T)                                                                        \
  template void layernorm_forward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t,  \
                                     double);                                                     \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,         \
                                      const T*, int64_t, int64_t);                                \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, double, int64_t, \
                                   int64_t, double);                                              \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t,      \
                                    int64_t, int64_t, int64_t, double);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
