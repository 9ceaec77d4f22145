// Residual adds, gradient accumulation and reductions.
#include <algorithm>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

template <typename T> void add(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template <typename T> void accumulate(T* dst, const T* src, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

template <typename T> void scale(T* x, T s, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

template <typename T> double sum_squares(const T* x, int64_t n) {
  constexpr int64_t kBlock = 1 << 14;
  int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(nb);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    double acc = 0;
    for (int64_t i = b * kBlock, e = std::min(n, (b + 1) * kBlock); i < e; ++i)
      acc += static_cast<double>(x[i]) * x[i];
    partial[b] = acc;
  }
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

#define LMF_INSTANTIATE(T)                                        \
  template void add<T>(T*, const T*, const T*, int64_t);          \
  template void accumulate<T>(T*, const T*, int64_t);             \
  template void scale<T>(T*, T, int64_t);                         \
  template double sum_squares<T>(const T*, int64_t);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu
