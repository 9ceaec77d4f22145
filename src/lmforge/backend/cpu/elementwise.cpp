// Residual adds, gradient accumulation and reductions.
#include <algorithm>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

template <typename T>
void add(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
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
double sum_squares(const T* x, int64_t n) {
  // At most kMaxBlocks fixed blocks, summed in order: no allocation, and the same result for
  // any thread count.
  constexpr int64_t kMaxBlocks = 256;
  const int64_t block = std::max<int64_t>(1 << 12, (n + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t nb = (n + block - 1) / block;
  double partial[kMaxBlocks];
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    double acc = 0;
    for (int64_t i = b * block, e = std::min(n, (b + 1) * block); i < e; ++i)
      acc += static_cast<double>(x[i]) * x[i];
    partial[b] = acc;
  }
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) total += partial[b];
  return total;
}

#define LMF_INSTANTIATE(T)                               \
  template void add<T>(T*, const T*, const T*, int64_t); \
  template void accumulate<T>(T*, const T*, int64_t);    \
  template void scale<T>(T*, T, int64_t);                \
  template double sum_squares<T>(const T*, int64_t);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu
