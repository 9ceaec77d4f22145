// GELU, tanh approximation (Hendrycks & Gimpel 2016; GPT-2's "gelu_new"), and the gated MLPs
// (Shazeer 2020): SwiGLU (Llama's), silu(gate) * up, and GeGLU (Gemma's), gelu_tanh(gate) * up.
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
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)
constexpr int64_t kChunk = 1 << 12;            // elements per vectorized task

// The AVX-512 kernels, on fp32 or bf16 (In, Out) memory: bf16 inputs widened, bf16 outputs rounded
// to nearest even (as to_bf16), a bf16 gradient written where an fp32 one is added to (prior16);
// the same fp32 arithmetic either way. Compiled with AVX512-BF16 enabled for the bf16 store; the
// fp32 instantiations hold no bf16 instruction, so AVX-512 CPUs without it run them (pick).
// An activation of x on 16 lanes and, with grad, its derivative: silu, or the tanh GELU
// (0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); its derivative
// 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)).
template <Gate G>
LMF_AVX512_BF16 inline __m512 gate512(__m512 x, __m512* grad) {
  if constexpr (G == Gate::kSilu) {
    const __m512 s = sigmoid512(x);
    if (grad)
      *grad = _mm512_mul_ps(
          s, _mm512_fmadd_ps(x, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), _mm512_set1_ps(1.0f)));
    return _mm512_mul_ps(x, s);
  } else {
    const __m512 c = _mm512_set1_ps(static_cast<float>(kGeluC)), k = _mm512_set1_ps(0.044715f),
                 k3 = _mm512_set1_ps(static_cast<float>(3 * 0.044715)), half = _mm512_set1_ps(0.5f),
                 one = _mm512_set1_ps(1.0f);
    const __m512 x2 = _mm512_mul_ps(x, x);
    const __m512 th = tanh512(_mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(k, x), x2, x)));
    const __m512 hx = _mm512_mul_ps(half, x);
    if (grad)
      *grad = _mm512_fmadd_ps(_mm512_mul_ps(hx, _mm512_fnmadd_ps(th, th, one)),
                              _mm512_mul_ps(c, _mm512_fmadd_ps(k3, x2, one)),
                              _mm512_mul_ps(half, _mm512_add_ps(one, th)));
    return _mm512_mul_ps(hx, _mm512_add_ps(one, th));
  }
}

template <typename Out, typename In>
LMF_AVX512_BF16 inline void gelu_forward_avx512(Out* out, const In* inp, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = lanes(n - i);
    store16(out + i, m, gate512<Gate::kGelu>(load16(inp + i, m), nullptr));
  }
}

template <typename Out, typename In>
LMF_AVX512_BF16 inline void gelu_backward_avx512(Out* dinp, const In* inp, const float* dout,
                                                 int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = lanes(n - i);
    __m512 g;
    gate512<Gate::kGelu>(load16(inp + i, m), &g);
    store16(dinp + i, m,
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, dout + i), g, prior16(dinp + i, m)));
  }
}

template <Gate G, typename Out, typename In>
LMF_AVX512_BF16 inline void glu_forward_avx512(Out* out, const In* g, const In* u, int64_t F) {
  for (int64_t f = 0; f < F; f += 16) {
    __mmask16 m = lanes(F - f);
    __m512 x = load16(g + f, m);
    store16(out + f, m, _mm512_mul_ps(gate512<G>(x, nullptr), load16(u + f, m)));
  }
}

template <Gate G, typename Out, typename In>
LMF_AVX512_BF16 inline void glu_backward_avx512(Out* dg, Out* du, const In* g, const In* u,
                                                const float* dout, int64_t F) {
  for (int64_t f = 0; f < F; f += 16) {
    __mmask16 m = lanes(F - f);
    __m512 x = load16(g + f, m), up = load16(u + f, m);
    __m512 d = _mm512_maskz_loadu_ps(m, dout + f), grad;
    // dg += d u act'(g); du += d act(g)
    const __m512 a = gate512<G>(x, &grad);
    store16(dg + f, m, _mm512_fmadd_ps(_mm512_mul_ps(d, up), grad, prior16(dg + f, m)));
    store16(du + f, m, _mm512_fmadd_ps(d, a, prior16(du + f, m)));
  }
}

// The same kernels on 8 lanes (AVX2 + FMA); the last n % 8 elements by the scalar formulas.
float gelu_scalar(float x) {
  const float u = static_cast<float>(kGeluC) * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(u));
}
float gelu_grad_scalar(float x) {
  const float th = std::tanh(static_cast<float>(kGeluC) * (x + 0.044715f * x * x * x));
  const float du = static_cast<float>(kGeluC) * (1.0f + static_cast<float>(3 * 0.044715) * x * x);
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}
float sigmoid_scalar(float x) { return 1.0f / (1.0f + std::exp(-x)); }

template <Gate G>
LMF_AVX2 inline __m256 gate256(__m256 x, __m256* grad) {  // as gate512
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (G == Gate::kSilu) {
    const __m256 s = sigmoid256(x);
    if (grad) *grad = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
    return _mm256_mul_ps(x, s);
  } else {
    const __m256 c = _mm256_set1_ps(static_cast<float>(kGeluC)), k = _mm256_set1_ps(0.044715f),
                 k3 = _mm256_set1_ps(static_cast<float>(3 * 0.044715)), half = _mm256_set1_ps(0.5f);
    const __m256 x2 = _mm256_mul_ps(x, x);
    const __m256 th = tanh256(_mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, x), x2, x)));
    const __m256 hx = _mm256_mul_ps(half, x);
    if (grad)
      *grad = _mm256_fmadd_ps(_mm256_mul_ps(hx, _mm256_fnmadd_ps(th, th, one)),
                              _mm256_mul_ps(c, _mm256_fmadd_ps(k3, x2, one)),
                              _mm256_mul_ps(half, _mm256_add_ps(one, th)));
    return _mm256_mul_ps(hx, _mm256_add_ps(one, th));
  }
}

LMF_AVX2 void gelu_forward_avx2(float* out, const float* inp, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, gate256<Gate::kGelu>(_mm256_loadu_ps(inp + i), nullptr));
  for (; i < n; ++i) out[i] = gelu_scalar(inp[i]);
}

LMF_AVX2 void gelu_backward_avx2(float* dinp, const float* inp, const float* dout, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 g;
    gate256<Gate::kGelu>(_mm256_loadu_ps(inp + i), &g);
    _mm256_storeu_ps(dinp + i,
                     _mm256_fmadd_ps(_mm256_loadu_ps(dout + i), g, _mm256_loadu_ps(dinp + i)));
  }
  for (; i < n; ++i) dinp[i] += dout[i] * gelu_grad_scalar(inp[i]);
}

float gate_scalar(Gate G, float x) {
  return G == Gate::kSilu ? x * sigmoid_scalar(x) : gelu_scalar(x);
}
float gate_grad_scalar(Gate G, float x) {
  if (G == Gate::kGelu) return gelu_grad_scalar(x);
  const float s = sigmoid_scalar(x);
  return s * (1.0f + x * (1.0f - s));
}

template <Gate G>
LMF_AVX2 void glu_forward_avx2(float* out, const float* g, const float* u, int64_t F) {
  int64_t f = 0;
  for (; f + 8 <= F; f += 8)
    _mm256_storeu_ps(out + f, _mm256_mul_ps(gate256<G>(_mm256_loadu_ps(g + f), nullptr),
                                            _mm256_loadu_ps(u + f)));
  for (; f < F; ++f) out[f] = gate_scalar(G, g[f]) * u[f];
}

template <Gate G>
LMF_AVX2 void glu_backward_avx2(float* dg, float* du, const float* g, const float* u,
                                const float* dout, int64_t F) {
  int64_t f = 0;
  for (; f + 8 <= F; f += 8) {
    const __m256 x = _mm256_loadu_ps(g + f), up = _mm256_loadu_ps(u + f),
                 d = _mm256_loadu_ps(dout + f);
    __m256 grad;
    const __m256 a = gate256<G>(x, &grad);
    _mm256_storeu_ps(dg + f, _mm256_fmadd_ps(_mm256_mul_ps(d, up), grad, _mm256_loadu_ps(dg + f)));
    _mm256_storeu_ps(du + f, _mm256_fmadd_ps(d, a, _mm256_loadu_ps(du + f)));
  }
  for (; f < F; ++f) {
    const float d = dout[f];
    dg[f] += d * u[f] * gate_grad_scalar(G, g[f]);
    du[f] += d * gate_scalar(G, g[f]);
  }
}

// The gate's activation and derivative in T (the plain loops: no AVX2, and the fp64 checks).
template <typename T>
T gate_value(Gate G, T x, T* grad) {
  if (G == Gate::kSilu) {
    const T s = T(1) / (T(1) + std::exp(-x));
    if (grad) *grad = s * (T(1) + x * (T(1) - s));
    return x * s;
  }
  const T th = std::tanh(T(kGeluC) * (x + T(0.044715) * x * x * x));
  if (grad)
    *grad = T(0.5) * (T(1) + th) +
            T(0.5) * x * (T(1) - th * th) * T(kGeluC) * (T(1) + T(3 * 0.044715) * x * x);
  return T(0.5) * x * (T(1) + th);
}

// The kernel for this CPU: the AVX-512 one, else the AVX2 one, else null (the portable loop).
template <typename Fn>
Fn* pick(Fn* avx512, Fn* avx2) {
  return has_avx512() ? avx512 : has_avx2() ? avx2 : nullptr;
}
}  // namespace

// fp32 with AVX-512 or AVX2: the vectorized kernels above (exp-based tanh/sigmoid within a few
// ulp); otherwise, and for the fp64 gradient checks, the plain loops.
template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (auto k = pick(gelu_forward_avx512<float, float>, gelu_forward_avx2)) {
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < n; c += kChunk) k(out + c, inp + c, std::min(kChunk, n - c));
      return;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T x = inp[i];
    T u = T(kGeluC) * (x + T(0.044715) * x * x * x);
    out[i] = T(0.5) * x * (T(1) + std::tanh(u));
  }
}

template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (auto k = pick(gelu_backward_avx512<float, float>, gelu_backward_avx2)) {
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < n; c += kChunk)
        k(dinp + c, inp + c, dout + c, std::min(kChunk, n - c));
      return;
    }
  }
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
void glu_forward(T* out, const T* inp, int64_t N, int64_t F, Gate gate) {
  if constexpr (std::is_same_v<T, float>) {
    auto k =
        gate == Gate::kSilu
            ? pick(glu_forward_avx512<Gate::kSilu, float, float>, glu_forward_avx2<Gate::kSilu>)
            : pick(glu_forward_avx512<Gate::kGelu, float, float>, glu_forward_avx2<Gate::kGelu>);
    if (k) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < N; ++i) k(out + i * F, inp + i * 2 * F, inp + i * 2 * F + F, F);
      return;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* g = inp + i * 2 * F;
    const T* u = g + F;
    for (int64_t f = 0; f < F; ++f) out[i * F + f] = gate_value<T>(gate, g[f], nullptr) * u[f];
  }
}

template <typename T>
void glu_backward(T* dinp, const T* inp, const T* dout, int64_t N, int64_t F, Gate gate) {
  if constexpr (std::is_same_v<T, float>) {
    auto k =
        gate == Gate::kSilu
            ? pick(glu_backward_avx512<Gate::kSilu, float, float>, glu_backward_avx2<Gate::kSilu>)
            : pick(glu_backward_avx512<Gate::kGelu, float, float>, glu_backward_avx2<Gate::kGelu>);
    if (k) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < N; ++i)
        k(dinp + i * 2 * F, dinp + i * 2 * F + F, inp + i * 2 * F, inp + i * 2 * F + F,
          dout + i * F, F);
      return;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* g = inp + i * 2 * F;
    const T* u = g + F;
    T* dg = dinp + i * 2 * F;
    T* du = dg + F;
    for (int64_t f = 0; f < F; ++f) {
      T grad;
      const T a = gate_value<T>(gate, g[f], &grad), d = dout[i * F + f];
      dg[f] += d * u[f] * grad;
      du[f] += d * a;
    }
  }
}

bool gelu_forward_bf16(uint16_t* out, const uint16_t* inp, int64_t n) {
  if (!has_avx512_bf16()) return false;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n; c += kChunk)
    gelu_forward_avx512(out + c, inp + c, std::min(kChunk, n - c));
  return true;
}

bool gelu_backward_bf16(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t n) {
  if (!has_avx512_bf16()) return false;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n; c += kChunk)
    gelu_backward_avx512(dinp + c, inp + c, dout + c, std::min(kChunk, n - c));
  return true;
}

bool glu_forward_bf16(uint16_t* out, const uint16_t* inp, int64_t N, int64_t F, Gate gate) {
  if (!has_avx512_bf16()) return false;
  auto k = gate == Gate::kSilu ? glu_forward_avx512<Gate::kSilu, uint16_t, uint16_t>
                               : glu_forward_avx512<Gate::kGelu, uint16_t, uint16_t>;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) k(out + i * F, inp + i * 2 * F, inp + i * 2 * F + F, F);
  return true;
}

bool glu_backward_bf16(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t N, int64_t F,
                       Gate gate) {
  if (!has_avx512_bf16()) return false;
  auto k = gate == Gate::kSilu ? glu_backward_avx512<Gate::kSilu, uint16_t, uint16_t>
                               : glu_backward_avx512<Gate::kGelu, uint16_t, uint16_t>;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    k(dinp + i * 2 * F, dinp + i * 2 * F + F, inp + i * 2 * F, inp + i * 2 * F + F, dout + i * F,
      F);
  return true;
}

#define LMF_INSTANTIATE(T)                                            \
  template void gelu_forward<T>(T*, const T*, int64_t);               \
  template void gelu_backward<T>(T*, const T*, const T*, int64_t);    \
  template void glu_forward<T>(T*, const T*, int64_t, int64_t, Gate); \
  template void glu_backward<T>(T*, const T*, const T*, int64_t, int64_t, Gate);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
