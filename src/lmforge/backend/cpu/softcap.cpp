// Soft-capping (Gemma 2's attention and final logits): y = cap tanh(x / cap), which keeps |y|
// below cap and is the identity near 0; dy/dx = 1 - tanh^2 = 1 - (y / cap)^2. fp32 by tanh512
// (vecmath.h) where AVX-512 is present, else std::tanh; double by std::tanh (gradient checks).
#include <omp.h>

#include <cmath>
#include <type_traits>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/dtype.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for this file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lmforge::cpu {

namespace {

LMF_AVX512 void softcap_avx512(float* x, float* deriv, int64_t n, float cap, float in_scale) {
  const __m512 c = _mm512_set1_ps(cap), u = _mm512_set1_ps(in_scale / cap),
               one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(n - j);
    const __m512 t = tanh512(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), u));
    _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(c, t));
    if (deriv) _mm512_mask_storeu_ps(deriv + j, k, _mm512_fnmadd_ps(t, t, one));
  }
}

// dy (1 - (y / cap)^2) on the lanes of k
LMF_AVX512 inline __m512 softcap_grad16(const float* dy, const float* y, __mmask16 k, float cap) {
  const __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y), _mm512_set1_ps(1.0f / cap));
  return _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dy), _mm512_fnmadd_ps(t, t, _mm512_set1_ps(1.0f)));
}
LMF_AVX512 void softcap_grad_avx512(float* dx, const float* dy, const float* y, int64_t n,
                                    float cap) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(n - j);
    store16(dx + j, k, softcap_grad16(dy + j, y + j, k, cap));
  }
}
LMF_AVX512_BF16 void softcap_grad_avx512(uint16_t* dx, const float* dy, const float* y, int64_t n,
                                         float cap) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(n - j);
    store16(dx + j, k, softcap_grad16(dy + j, y + j, k, cap));
  }
}

inline void put(float* p, float v) { *p = v; }
inline void put(double* p, double v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = fp32_to_bf16(v); }

}  // namespace

template <typename T>
void softcap_serial(T* x, T* deriv, int64_t n, T cap, T in_scale) {
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return softcap_avx512(x, deriv, n, cap, in_scale);
  }
  for (int64_t j = 0; j < n; ++j) {
    const T t = std::tanh(x[j] * in_scale / cap);
    x[j] = cap * t;
    if (deriv) deriv[j] = T(1) - t * t;
  }
}

template <typename T>
void softcap_rows(T* x, int64_t rows, int64_t cols, T cap) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) softcap_serial<T>(x + r * cols, nullptr, cols, cap, T(1));
}

template <typename D, typename T>
void softcap_grad_rows(D* dx, int64_t ldd, const T* dy, const T* y, int64_t rows, int64_t cols,
                       T cap) {
  bool vec = false;
  if constexpr (std::is_same_v<D, float>) vec = has_avx512();
  if constexpr (std::is_same_v<D, uint16_t>) vec = has_avx512_bf16();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    D* d = dx + r * ldd;
    const T *g = dy + r * cols, *yr = y + r * cols;
    if constexpr (!std::is_same_v<D, double>) {
      if (vec) {
        softcap_grad_avx512(d, g, yr, cols, cap);
        continue;
      }
    }
    // (the vector kernel's operations: y times 1 / cap, 1 - t t fused)
    const T r = T(1) / cap;
    for (int64_t j = 0; j < cols; ++j) {
      const T t = yr[j] * r;
      put(d + j, g[j] * std::fma(-t, t, T(1)));
    }
  }
}

template void softcap_serial<float>(float*, float*, int64_t, float, float);
template void softcap_serial<double>(double*, double*, int64_t, double, double);
template void softcap_rows<float>(float*, int64_t, int64_t, float);
template void softcap_rows<double>(double*, int64_t, int64_t, double);
template void softcap_grad_rows<float, float>(float*, int64_t, const float*, const float*, int64_t,
                                              int64_t, float);
template void softcap_grad_rows<uint16_t, float>(uint16_t*, int64_t, const float*, const float*,
                                                 int64_t, int64_t, float);
template void softcap_grad_rows<double, double>(double*, int64_t, const double*, const double*,
                                                int64_t, int64_t, double);

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
