// LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the last dimension.
// Row statistics accumulate in double. Weight/bias gradients are column sums over rows, split
// by column so they are deterministic whatever the thread count.
#include <algorithm>
#include <cmath>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

namespace {
constexpr int64_t kCols = 64;  // columns per task in the weight-gradient sums
}

template <typename T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* weight, const T* bias,
                       int64_t N, int64_t C, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
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
    for (int64_t i = 0; i < N; ++i) {
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
                     double eps, int64_t group, int64_t stride) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t at = row_offset(i, C, group, stride);
    const T* x = inp + at;
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
    double s = 1.0 / std::sqrt(ss / C + eps);
    T* o = out + at;
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(x[c] * s) * weight[c];
    rstd[i] = static_cast<T>(s);
  }
}

template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int64_t N, int64_t C, int64_t group, int64_t stride) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t at = row_offset(i, C, group, stride);
    const T* x = inp + at;
    const T* g = dout + at;
    double s = rstd[i];
    double dot = 0;  // mean(dn * n)
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(weight[c]) * g[c] * x[c] * s;
    dot /= C;
    T* d = dinp + at;
    for (int64_t c = 0; c < C; ++c) {
      double n = x[c] * s;
      d[c] += static_cast<T>(s * (static_cast<double>(weight[c]) * g[c] - n * dot));
    }
  }
  if (!dweight) return;  // frozen
  const int64_t blocks = (C + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kCols, nc = std::min(kCols, C - c0);
    double dw[kCols] = {};
    for (int64_t i = 0; i < N; ++i) {
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
                                   int64_t);                                                      \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t,      \
                                    int64_t, int64_t, int64_t);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu
