// Softmax cross-entropy over the vocabulary with an ignore index (as torch's
// F.cross_entropy(ignore_index=...)). logsumexp is accumulated in double.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/error.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for this file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lmforge::cpu {

namespace {
template <typename T>
double row_logsumexp(const T* x, int64_t V) {
  T mx = x[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, x[v]);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(x[v] - mx));
  return mx + std::log(sum);
}

// Two halves of an fp32 vector added to double accumulators.
LMF_AVX512 inline void add_pd(__m512d& acc, __m512 v) {
  acc = _mm512_add_pd(_mm512_add_pd(acc, lo_pd(v)), hi_pd(v));
}

// As row_logsumexp<float>: max, then sum of exp(x - max) in double lanes.
LMF_AVX512 double row_logsumexp_avx512(const float* x, int64_t V) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 mx = ninf;
  for (int64_t v = 0; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, m, x + v));
  }
  const float fmx = _mm512_reduce_max_ps(mx);
  const __m512 vmx = _mm512_set1_ps(fmx);
  __m512d acc = _mm512_setzero_pd();
  for (int64_t v = 0; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + v), vmx));
    add_pd(acc, _mm512_maskz_mov_ps(m, e));
  }
  return fmx + std::log(_mm512_reduce_add_pd(acc));
}

// d = coef * exp(x - lse) (d may alias x); the caller then subtracts dloss at the target.
LMF_AVX512 void softmax_grad_avx512(float* d, const float* x, int64_t V, float lse, float coef) {
  const __m512 vl = _mm512_set1_ps(lse), vc = _mm512_set1_ps(coef);
  for (int64_t v = 0; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + v), vl));
    _mm512_mask_storeu_ps(d + v, m, _mm512_mul_ps(p, vc));
  }
}

// The same on 8 lanes (AVX2); the last V % 8 logits scalar. s > 0: the logsumexp of x * s
// (distillation's temperature; multiplying by 1 is exact).
LMF_AVX2 double row_logsumexp_avx2(const float* x, int64_t V, float s = 1.0f) {
  __m256 mx = _mm256_set1_ps(-__builtin_inff());
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + v));
  alignas(32) float lanes8[8];
  _mm256_store_ps(lanes8, mx);
  float fmx = lanes8[0];
  for (int k = 1; k < 8; ++k) fmx = std::max(fmx, lanes8[k]);
  for (int64_t t = v; t < V; ++t) fmx = std::max(fmx, x[t]);
  const __m256 vmx = _mm256_set1_ps(fmx), vs = _mm256_set1_ps(s);
  __m256d acc = _mm256_setzero_pd();
  for (v = 0; v + 8 <= V; v += 8) {
    const __m256 e = exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + v), vmx), vs));
    acc = _mm256_add_pd(_mm256_add_pd(acc, lo_pd256(e)), hi_pd256(e));
  }
  double sum = hsum256d(acc);
  for (; v < V; ++v) sum += std::exp(static_cast<double>((x[v] - fmx) * s));
  return static_cast<double>(fmx) * s + std::log(sum);
}

LMF_AVX2 void softmax_grad_avx2(float* d, const float* x, int64_t V, float lse, float coef) {
  const __m256 vl = _mm256_set1_ps(lse), vc = _mm256_set1_ps(coef);
  int64_t v = 0;
  for (; v + 8 <= V; v += 8)
    _mm256_storeu_ps(d + v, _mm256_mul_ps(exp256(_mm256_sub_ps(_mm256_loadu_ps(x + v), vl)), vc));
  for (; v < V; ++v) d[v] = coef * std::exp(x[v] - lse);
}

template <typename T>
double lse_of(const T* x, int64_t V) {
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return row_logsumexp_avx512(x, V);
    if (has_avx2()) return row_logsumexp_avx2(x, V);
  }
  return row_logsumexp(x, V);
}
}  // namespace

namespace {
// Row i's gradient d(lse - x_y + z lse^2) / dx_v = dloss (p_v (1 + 2 z lse) - [v == y]), from
// its lse; x is read before d (which may alias it) is written.
template <typename T>
void grad_row(T* d, const T* x, int64_t V, int32_t y, double lse, T dloss, double z_loss) {
  double zf = 1.0 + 2.0 * z_loss * lse;
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512() || has_avx2()) {
      const float xy = x[y];  // before d overwrites it
      if (has_avx512())
        softmax_grad_avx512(d, x, V, static_cast<float>(lse), static_cast<float>(dloss * zf));
      else
        softmax_grad_avx2(d, x, V, static_cast<float>(lse), static_cast<float>(dloss * zf));
      d[y] = static_cast<float>(dloss * (std::exp(static_cast<double>(xy) - lse) * zf - 1.0));
      return;
    }
  }
  for (int64_t v = 0; v < V; ++v) {
    double p = std::exp(static_cast<double>(x[v]) - lse);
    d[v] = static_cast<T>(dloss * (p * zf - (v == y ? 1.0 : 0.0)));
  }
}
}  // namespace

template <typename T>
void softmax_xent_forward(T* losses, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                          int32_t ignore_index, double* lse_sq_sum) {
  double zsum = 0;
  IdCheck check;
#pragma omp parallel for schedule(static) reduction(+ : zsum)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    if (y == ignore_index || !check.ok(targets, i, V)) {
      losses[i] = T(0);
      continue;
    }
    const T* x = logits + i * V;
    double lse = lse_of(x, V);
    losses[i] = static_cast<T>(lse - x[y]);
    zsum += lse * lse;
  }
  check.raise(targets, "target", V);
  if (lse_sq_sum) *lse_sq_sum = zsum;
}

template <typename T>
void softmax_xent_backward(T* dlogits, const T* logits, const int32_t* targets, T dloss, int64_t N,
                           int64_t V, int32_t ignore_index, double z_loss) {
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    const T* x = logits + i * V;
    T* d = dlogits + i * V;
    if (y == ignore_index || !check.ok(targets, i, V)) {
      for (int64_t v = 0; v < V; ++v) d[v] = T(0);
      continue;
    }
    grad_row(d, x, V, y, lse_of(x, V), dloss, z_loss);  // lse read fully before d is written
  }
  check.raise(targets, "target", V);
}

template <typename T>
void softmax_xent_forward_backward(T* losses, T* dlogits, const T* logits, const int32_t* targets,
                                   T dloss, int64_t N, int64_t V, int32_t ignore_index,
                                   double z_loss, double* lse_sq_sum, const float* row_scale) {
  double zsum = 0;
  IdCheck check;
#pragma omp parallel for schedule(static) reduction(+ : zsum)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    const T* x = logits + i * V;
    T* d = dlogits + i * V;
    if (y == ignore_index || !check.ok(targets, i, V)) {
      losses[i] = T(0);
      for (int64_t v = 0; v < V; ++v) d[v] = T(0);
      continue;
    }
    const double lse = lse_of(x, V);
    losses[i] = static_cast<T>(lse - x[y]);  // before d (which may alias x) is written
    zsum += lse * lse;
    grad_row(d, x, V, y, lse, row_scale ? static_cast<T>(dloss * row_scale[i]) : dloss, z_loss);
  }
  check.raise(targets, "target", V);
  if (lse_sq_sum) *lse_sq_sum = zsum;
}

namespace {
// The distillation row's gradient without the one-hot term, d = ca p + cb (p^T - q), and its KL
// sum q (log q - log p^T), on 8 lanes (d may alias x).
LMF_AVX2 double distill_row_avx2(float* d, const float* x, const float* t, int64_t V, float inv_t,
                                 float lse, float lse_s, float lse_t, float ca, float cb) {
  const __m256 vi = _mm256_set1_ps(inv_t), vl = _mm256_set1_ps(lse), vls = _mm256_set1_ps(lse_s),
               vlt = _mm256_set1_ps(lse_t), va = _mm256_set1_ps(ca), vb = _mm256_set1_ps(cb);
  __m256d acc = _mm256_setzero_pd();
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) {
    const __m256 xv = _mm256_loadu_ps(x + v), tv = _mm256_loadu_ps(t + v);
    const __m256 log_q = _mm256_fmsub_ps(tv, vi, vlt), log_ps = _mm256_fmsub_ps(xv, vi, vls);
    const __m256 q = exp256(log_q), ps = exp256(log_ps), p = exp256(_mm256_sub_ps(xv, vl));
    const __m256 k = _mm256_mul_ps(q, _mm256_sub_ps(log_q, log_ps));
    acc = _mm256_add_pd(_mm256_add_pd(acc, lo_pd256(k)), hi_pd256(k));
    _mm256_storeu_ps(d + v, _mm256_fmadd_ps(va, p, _mm256_mul_ps(vb, _mm256_sub_ps(ps, q))));
  }
  double kl = hsum256d(acc);
  for (; v < V; ++v) {
    const float xv = x[v], log_q = t[v] * inv_t - lse_t, log_ps = xv * inv_t - lse_s;
    const float q = std::exp(log_q);
    kl += static_cast<double>(q) * (log_q - log_ps);
    d[v] = ca * std::exp(xv - lse) + cb * (std::exp(log_ps) - q);
  }
  return kl;
}
}  // namespace

void softmax_distill_forward_backward(float* losses, float* kl, float* dlogits, const float* logits,
                                      const float* teacher, const int32_t* targets, float dloss,
                                      int64_t N, int64_t V, int32_t ignore_index, double alpha,
                                      double temperature) {
  const double inv_t = 1.0 / temperature;
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const int32_t y = targets[i];
    const float* x = logits + i * V;
    const float* t = teacher + i * V;
    float* d = dlogits + i * V;
    if (y == ignore_index || !check.ok(targets, i, V)) {
      losses[i] = kl[i] = 0.0f;
      for (int64_t v = 0; v < V; ++v) d[v] = 0.0f;
      continue;
    }
    // logsumexp of the logits, and of the student's and the teacher's at temperature T.
    const double lse = lse_of(x, V);
    if (has_avx2()) {
      const float s = static_cast<float>(inv_t);
      const double lse_s = row_logsumexp_avx2(x, V, s), lse_t = row_logsumexp_avx2(t, V, s);
      const double ce = lse - x[y];  // before d (which may alias x) is written
      const float ca = static_cast<float>(dloss * (1 - alpha));
      const double kl_sum = distill_row_avx2(d, x, t, V, s, static_cast<float>(lse),
                                             static_cast<float>(lse_s), static_cast<float>(lse_t),
                                             ca, static_cast<float>(dloss * alpha * temperature));
      d[y] -= ca;  // the one-hot term of the cross-entropy's gradient
      kl[i] = static_cast<float>(kl_sum);
      losses[i] = static_cast<float>((1 - alpha) * ce + alpha * temperature * temperature * kl_sum);
      continue;
    }
    double ms = -INFINITY, mt = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      ms = std::max(ms, x[v] * inv_t);
      mt = std::max(mt, t[v] * inv_t);
    }
    double ss = 0, st = 0;
    for (int64_t v = 0; v < V; ++v) {
      ss += std::exp(x[v] * inv_t - ms);
      st += std::exp(t[v] * inv_t - mt);
    }
    const double lse_s = ms + std::log(ss), lse_t = mt + std::log(st);
    const double ce = lse - x[y];  // before d (which may alias x) is written
    // KL(q || p) = sum q (log q - log p); d/dx_v of (1 - a) CE + a T^2 KL =
    // (1 - a)(p_v - [v == y]) + a T (p^T_v - q_v).
    double kl_sum = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double xv = x[v], log_q = t[v] * inv_t - lse_t, log_ps = xv * inv_t - lse_s;
      const double q = std::exp(log_q);
      kl_sum += q * (log_q - log_ps);
      const double g = (1 - alpha) * (std::exp(xv - lse) - (v == y ? 1.0 : 0.0)) +
                       alpha * temperature * (std::exp(log_ps) - q);
      d[v] = static_cast<float>(dloss * g);
    }
    kl[i] = static_cast<float>(kl_sum);
    losses[i] = static_cast<float>((1 - alpha) * ce + alpha * temperature * temperature * kl_sum);
  }
  check.raise(targets, "target", V);
}

template void softmax_xent_forward<float>(float*, const float*, const int32_t*, int64_t, int64_t,
                                          int32_t, double*);
template void softmax_xent_forward<double>(double*, const double*, const int32_t*, int64_t, int64_t,
                                           int32_t, double*);
template void softmax_xent_backward<float>(float*, const float*, const int32_t*, float, int64_t,
                                           int64_t, int32_t, double);
template void softmax_xent_backward<double>(double*, const double*, const int32_t*, double, int64_t,
                                            int64_t, int32_t, double);
template void softmax_xent_forward_backward<float>(float*, float*, const float*, const int32_t*,
                                                   float, int64_t, int64_t, int32_t, double,
                                                   double*, const float*);
template void softmax_xent_forward_backward<double>(double*, double*, const double*, const int32_t*,
                                                    double, int64_t, int64_t, int32_t, double,
                                                    double*, const float*);

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
