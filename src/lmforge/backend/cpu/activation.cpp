// GELU, tanh approximation (Hendrycks & Gimpel 2016; GPT-2's "gelu_new"), and SwiGLU
// (Shazeer 2020; Llama's MLP): silu(gate) * up.
#include <cmath>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

namespace {
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)
}

template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T x = inp[i];
    T u = T(kGeluC) * (x + T(0.044715) * x * x * x);
    out[i] = T(0.5) * x * (T(1) + std::tanh(u));
  }
}

template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T x = inp[i];
    T u = T(kGeluC) * (x + T(0.044715) * x * x * x);
    T th = std::tanh(u);
    T sech2 = T(1) - th * th;
    T du = T(kGeluC) * (T(1) + T(3 * 0.044715) * x * x);
    dinp[i] += dout[i] * (T(0.5) * (T(1) + th) + T(0.5) * x * sech2 * du);
  }
}

template <typename T>
void swiglu_forward(T* out, const T* inp, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* g = inp + i * 2 * F;
    const T* u = g + F;
    for (int64_t f = 0; f < F; ++f) {
      T s = T(1) / (T(1) + std::exp(-g[f]));
      out[i * F + f] = g[f] * s * u[f];
    }
  }
}

template <typename T>
void swiglu_backward(T* dinp, const T* inp, const T* dout, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* g = inp + i * 2 * F;
    const T* u = g + F;
    T* dg = dinp + i * 2 * F;
    T* du = dg + F;
    for (int64_t f = 0; f < F; ++f) {
      T s = T(1) / (T(1) + std::exp(-g[f]));
      T d = dout[i * F + f];
      dg[f] += d * u[f] * s * (T(1) + g[f] * (T(1) - s));
      du[f] += d * g[f] * s;
    }
  }
}

#define LMF_INSTANTIATE(T)                                         \
  template void gelu_forward<T>(T*, const T*, int64_t);            \
  template void gelu_backward<T>(T*, const T*, const T*, int64_t); \
  template void swiglu_forward<T>(T*, const T*, int64_t, int64_t); \
  template void swiglu_backward<T>(T*, const T*, const T*, int64_t, int64_t);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu
