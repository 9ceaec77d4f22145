// Softmax cross-entropy over the vocabulary with an ignore index (as torch's
// F.cross_entropy(ignore_index=...)). logsumexp is accumulated in double.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/backend/distill_stats.h"
#include "lmforge/core/dtype.h"
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

LMF_AVX512 float row_max_avx512(const float* x, int64_t V) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 mx = ninf;
  for (int64_t v = 0; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, m, x + v));
  }
  return _mm512_reduce_max_ps(mx);
}

// The sum of exp(x - mx) in double lanes; kStore: each exp also written to e (which may alias x).
template <bool kStore>
LMF_AVX512 double exp_sum_avx512(float* e, const float* x, int64_t V, float mx) {
  const __m512 vmx = _mm512_set1_ps(mx);
  // Four independent accumulators (the low and high halves of even and odd vectors): the adds'
  // latency, not the exps, bounded one chain.
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                    _mm512_setzero_pd()};
  int64_t v = 0;
  for (; v + 32 <= V; v += 32) {
    const __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + v), vmx));
    const __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + v + 16), vmx));
    if constexpr (kStore) {
      _mm512_storeu_ps(e + v, e0);
      _mm512_storeu_ps(e + v + 16, e1);
    }
    acc[0] = _mm512_add_pd(acc[0], lo_pd(e0));
    acc[1] = _mm512_add_pd(acc[1], hi_pd(e0));
    acc[2] = _mm512_add_pd(acc[2], lo_pd(e1));
    acc[3] = _mm512_add_pd(acc[3], hi_pd(e1));
  }
  for (; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    __m512 ev = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + v), vmx));
    ev = _mm512_maskz_mov_ps(m, ev);
    if constexpr (kStore) _mm512_mask_storeu_ps(e + v, m, ev);
    acc[0] = _mm512_add_pd(acc[0], lo_pd(ev));
    acc[1] = _mm512_add_pd(acc[1], hi_pd(ev));
  }
  return _mm512_reduce_add_pd(
      _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
}

// d = e * c (d may alias e); the bf16 one rounded as to_bf16 rounds.
LMF_AVX512_BF16 void scale_row_bf16_avx512(uint16_t* d, const float* e, int64_t V, float c) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t v = 0; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    store16(d + v, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e + v), vc));
  }
}
LMF_AVX512 void scale_row_avx512(float* d, const float* e, int64_t V, float c) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t v = 0; v < V; v += 16) {
    __mmask16 m = lanes(V - v);
    _mm512_mask_storeu_ps(d + v, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e + v), vc));
  }
}

// The same on 8 lanes (AVX2); the last V % 8 logits scalar. s > 0: of x * s (distillation's
// temperature; multiplying by 1 is exact).
LMF_AVX2 float row_max_avx2(const float* x, int64_t V) {
  __m256 mx = _mm256_set1_ps(-__builtin_inff());
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + v));
  alignas(32) float lanes8[8];
  _mm256_store_ps(lanes8, mx);
  float fmx = lanes8[0];
  for (int k = 1; k < 8; ++k) fmx = std::max(fmx, lanes8[k]);
  for (int64_t t = v; t < V; ++t) fmx = std::max(fmx, x[t]);
  return fmx;
}

template <bool kStore>
LMF_AVX2 double exp_sum_avx2(float* e, const float* x, int64_t V, float fmx, float s = 1.0f) {
  const __m256 vmx = _mm256_set1_ps(fmx), vs = _mm256_set1_ps(s);
  __m256d acc = _mm256_setzero_pd();
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) {
    const __m256 ev = exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + v), vmx), vs));
    if constexpr (kStore) _mm256_storeu_ps(e + v, ev);
    acc = _mm256_add_pd(_mm256_add_pd(acc, lo_pd256(ev)), hi_pd256(ev));
  }
  double sum = hsum256d(acc);
  for (; v < V; ++v) {
    const double ev = std::exp(static_cast<double>((x[v] - fmx) * s));
    if constexpr (kStore) e[v] = static_cast<float>(ev);
    sum += ev;
  }
  return sum;
}

LMF_AVX2 double row_logsumexp_avx2(const float* x, int64_t V, float s = 1.0f) {
  const float fmx = row_max_avx2(x, V);
  return static_cast<double>(fmx) * s + std::log(exp_sum_avx2<false>(nullptr, x, V, fmx, s));
}

LMF_AVX2 void scale_row_avx2(float* d, const float* e, int64_t V, float c) {
  const __m256 vc = _mm256_set1_ps(c);
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) _mm256_storeu_ps(d + v, _mm256_mul_ps(_mm256_loadu_ps(e + v), vc));
  for (; v < V; ++v) d[v] = e[v] * c;
}

template <typename T>
double lse_of(const T* x, int64_t V) {
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) {
      const float mx = row_max_avx512(x, V);
      return mx + std::log(exp_sum_avx512<false>(nullptr, x, V, mx));
    }
    if (has_avx2()) return row_logsumexp_avx2(x, V);
  }
  return row_logsumexp(x, V);
}

// The calling thread's buffer of n Ts (grows in the first step only): a row's exponentials when
// its gradient goes out in bf16 (float), the rows' lse^2 before their sum in row order (double:
// the z-loss metric then does not depend on the thread count).
template <typename T>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

struct RowResult {
  double lse;
  double x_target;  // x[y], read before the gradient (which may alias x) is written
};

// Row i's training pass: its logsumexp and the gradient d(lse - x_y + z lse^2) / dx_v = dloss (p_v
// (1 + 2 z lse) - [v == y]) into d (fp32, may alias x) or d16 (bf16, rounded as to_bf16 rounds
// the fp32 values: to_bf16(d) bit for bit). With SIMD, p_v = e_v / sum where e_v = exp(x_v - max)
// is computed once, kept in d (or a thread's row) between the sum and the gradient: one exp per
// logit. Otherwise (double, or no AVX2) the lse first, then p_v = exp(x_v - lse) in double.
template <typename T>
RowResult train_row(T* d, uint16_t* d16, const T* x, int64_t V, int32_t y, T dloss, double z_loss) {
  const double xy = static_cast<double>(x[y]);
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512() || has_avx2()) {
      float* e = d16 ? thread_buffer<float>(V) : d;
      const bool avx512 = has_avx512();
      const float mx = avx512 ? row_max_avx512(x, V) : row_max_avx2(x, V);
      const double sum =
          avx512 ? exp_sum_avx512<true>(e, x, V, mx) : exp_sum_avx2<true>(e, x, V, mx);
      const double lse = mx + std::log(sum), zf = 1.0 + 2.0 * z_loss * lse, ey = e[y];
      const float c = static_cast<float>(dloss * zf / sum);
      const float dy = static_cast<float>(dloss * (ey / sum * zf - 1.0));
      if (d16 && has_avx512_bf16()) {
        scale_row_bf16_avx512(d16, e, V, c);
        d16[y] = fp32_to_bf16_ftz(dy);
        return {lse, xy};
      }
      if (avx512)
        scale_row_avx512(e, e, V, c);
      else
        scale_row_avx2(e, e, V, c);
      e[y] = dy;
      if (d16) to_bf16_serial(d16, e, V);
      return {lse, xy};
    }
  }
  const double lse = row_logsumexp(x, V), zf = 1.0 + 2.0 * z_loss * lse;
  T* g = d;
  if constexpr (std::is_same_v<T, float>)
    if (d16) g = thread_buffer<float>(V);
  for (int64_t v = 0; v < V; ++v) {
    double p = std::exp(static_cast<double>(x[v]) - lse);
    g[v] = static_cast<T>(dloss * (p * zf - (v == y ? 1.0 : 0.0)));
  }
  if constexpr (std::is_same_v<T, float>)
    if (d16) to_bf16_serial(d16, g, V);
  return {lse, xy};
}

// The rows of dlogits for rows i0 .. (fp32 rows V apart, or bf16 rows ld apart).
template <typename T>
struct GradRows {
  T* d;
  uint16_t* d16;
  int64_t ld;
  T* row(int64_t i, int64_t V) const { return d ? d + i * V : nullptr; }
  uint16_t* row16(int64_t i) const { return d16 ? d16 + i * ld : nullptr; }
  void zero(int64_t i, int64_t V) const {
    if (d)
      std::fill(d + i * V, d + (i + 1) * V, T(0));
    else
      std::fill(d16 + i * ld, d16 + i * ld + V, uint16_t{0});
  }
};

template <typename T>
void xent_backward_rows(const GradRows<T>& out, const T* logits, const int32_t* targets, T dloss,
                        int64_t N, int64_t V, int32_t ignore_index, double z_loss) {
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    if (y == ignore_index || !check.ok(targets, i, V)) {
      out.zero(i, V);
      continue;
    }
    train_row(out.row(i, V), out.row16(i), logits + i * V, V, y, dloss, z_loss);
  }
  check.raise(targets, "target", V);
}

template <typename T>
void xent_forward_backward_rows(T* losses, const GradRows<T>& out, const T* logits,
                                const int32_t* targets, T dloss, int64_t N, int64_t V,
                                int32_t ignore_index, double z_loss, double* lse_sq_sum,
                                const float* row_scale) {
  double* sq = thread_buffer<double>(N);
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    sq[i] = 0;
    if (y == ignore_index || !check.ok(targets, i, V)) {
      losses[i] = T(0);
      out.zero(i, V);
      continue;
    }
    const T dl = row_scale ? static_cast<T>(dloss * row_scale[i]) : dloss;
    const RowResult r = train_row(out.row(i, V), out.row16(i), logits + i * V, V, y, dl, z_loss);
    losses[i] = static_cast<T>(r.lse - r.x_target);
    sq[i] = r.lse * r.lse;
  }
  check.raise(targets, "target", V);
  if (lse_sq_sum) *lse_sq_sum = std::accumulate(sq, sq + N, 0.0);
}
}  // namespace

template <typename T>
void softmax_xent_forward(T* losses, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                          int32_t ignore_index, double* lse_sq_sum) {
  double* sq = thread_buffer<double>(N);
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    sq[i] = 0;
    if (y == ignore_index || !check.ok(targets, i, V)) {
      losses[i] = T(0);
      continue;
    }
    const T* x = logits + i * V;
    double lse = lse_of(x, V);
    losses[i] = static_cast<T>(lse - x[y]);
    sq[i] = lse * lse;
  }
  check.raise(targets, "target", V);
  if (lse_sq_sum) *lse_sq_sum = std::accumulate(sq, sq + N, 0.0);
}

template <typename T>
void softmax_xent_backward(T* dlogits, const T* logits, const int32_t* targets, T dloss, int64_t N,
                           int64_t V, int32_t ignore_index, double z_loss) {
  xent_backward_rows<T>({dlogits, nullptr, V}, logits, targets, dloss, N, V, ignore_index, z_loss);
}

void softmax_xent_backward_bf16(uint16_t* dlogits, int64_t ld, const float* logits,
                                const int32_t* targets, float dloss, int64_t N, int64_t V,
                                int32_t ignore_index, double z_loss) {
  xent_backward_rows<float>({nullptr, dlogits, ld}, logits, targets, dloss, N, V, ignore_index,
                            z_loss);
}

template <typename T>
void softmax_xent_forward_backward(T* losses, T* dlogits, const T* logits, const int32_t* targets,
                                   T dloss, int64_t N, int64_t V, int32_t ignore_index,
                                   double z_loss, double* lse_sq_sum, const float* row_scale) {
  xent_forward_backward_rows<T>(losses, {dlogits, nullptr, V}, logits, targets, dloss, N, V,
                                ignore_index, z_loss, lse_sq_sum, row_scale);
}

void softmax_xent_forward_backward_bf16(float* losses, uint16_t* dlogits, int64_t ld,
                                        const float* logits, const int32_t* targets, float dloss,
                                        int64_t N, int64_t V, int32_t ignore_index, double z_loss,
                                        double* lse_sq_sum, const float* row_scale) {
  xent_forward_backward_rows<float>(losses, {nullptr, dlogits, ld}, logits, targets, dloss, N, V,
                                    ignore_index, z_loss, lse_sq_sum, row_scale);
}

namespace {
// A row's max and sum of exp(x - max) (kStore: each exp also written to e, which may alias x).
template <bool kStore>
double max_and_exp_sum(float* e, const float* x, int64_t V, float& mx) {
  if (has_avx512()) {
    mx = row_max_avx512(x, V);
    return exp_sum_avx512<kStore>(e, x, V, mx);
  }
  if (has_avx2()) {
    mx = row_max_avx2(x, V);
    return exp_sum_avx2<kStore>(e, x, V, mx);
  }
  mx = x[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, x[v]);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) {
    const double ev = std::exp(static_cast<double>(x[v] - mx));
    if constexpr (kStore) e[v] = static_cast<float>(ev);
    sum += ev;
  }
  return sum;
}
}  // namespace

void softmax_xent_stats(double* stats, const float* logits, const int32_t* targets, int64_t N,
                        int64_t V, int32_t ignore_index, int64_t v0, int64_t vocab_total) {
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    double* st = stats + 3 * i;
    const int32_t y = targets[i];
    st[0] = st[1] = st[2] = 0;
    if (y == ignore_index || !check.ok(targets, i, vocab_total)) continue;
    const float* x = logits + i * V;
    float mx = 0;
    st[1] = max_and_exp_sum<false>(nullptr, x, V, mx);
    st[0] = mx;
    if (y >= v0 && y < v0 + V) st[2] = x[y - v0];
  }
  check.raise(targets, "target", vocab_total);
}

void softmax_xent_parallel(float* losses, double* lse_sq_sum, float* dlogits, uint16_t* dlogits16,
                           int64_t ld, const float* logits, const int32_t* targets,
                           const double* all_stats, int64_t P, float dloss, int64_t N, int64_t V,
                           int32_t ignore_index, double z_loss, int64_t v0,
                           const float* row_scale) {
  double* sq = thread_buffer<double>(N);
  const bool grad = dlogits || dlogits16;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const int32_t y = targets[i];
    sq[i] = 0;
    if (y == ignore_index) {  // (stats_ checked the targets)
      losses[i] = 0.0f;
      if (dlogits) std::fill(dlogits + i * V, dlogits + (i + 1) * V, 0.0f);
      if (dlogits16) std::fill(dlogits16 + i * ld, dlogits16 + i * ld + V, uint16_t{0});
      continue;
    }
    // The row's logsumexp over every rank's columns, and its target's logit (one rank's).
    double M = -INFINITY, xy = 0;
    for (int64_t k = 0; k < P; ++k) {
      M = std::max(M, all_stats[(k * N + i) * 3]);
      xy += all_stats[(k * N + i) * 3 + 2];
    }
    double S = 0;
    for (int64_t k = 0; k < P; ++k) {
      const double* st = all_stats + (k * N + i) * 3;
      S += st[1] * std::exp(st[0] - M);
    }
    const double lse = M + std::log(S);
    losses[i] = static_cast<float>(lse - xy);
    sq[i] = lse * lse;
    if (!grad) continue;
    // d_v = dl (1 + 2 z lse) exp(x_v - lse) - dl [v + v0 == y], with exp(x_v - lse) = exp(x_v -
    // mx) exp(mx - lse) for this rank's max mx (one exp per logit, as train_row).
    const float* x = logits + i * V;
    float* e = dlogits16 ? thread_buffer<float>(V) : dlogits + i * V;
    float mx = 0;
    max_and_exp_sum<true>(e, x, V, mx);
    const double dl = row_scale ? dloss * static_cast<double>(row_scale[i]) : dloss;
    const float c = static_cast<float>(dl * (1.0 + 2.0 * z_loss * lse) * std::exp(mx - lse));
    for (int64_t v = 0; v < V; ++v) e[v] *= c;
    if (y >= v0 && y < v0 + V) e[y - v0] -= static_cast<float>(dl);
    if (dlogits16) to_bf16_serial(dlogits16 + i * ld, e, V);
  }
  if (lse_sq_sum) *lse_sq_sum = std::accumulate(sq, sq + N, 0.0);
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

namespace {
// The teacher's part of a distillation row's KL: sum exp(t / T - lse_q) (t - x) / T, on 8 lanes.
LMF_AVX2 double distill_part_avx2(const float* x, const float* t, int64_t V, float inv_t,
                                  float lse_q) {
  const __m256 vi = _mm256_set1_ps(inv_t), vl = _mm256_set1_ps(lse_q);
  __m256d acc = _mm256_setzero_pd();
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) {
    const __m256 xv = _mm256_loadu_ps(x + v), tv = _mm256_loadu_ps(t + v);
    const __m256 q = exp256(_mm256_fmsub_ps(tv, vi, vl));
    const __m256 k = _mm256_mul_ps(q, _mm256_mul_ps(_mm256_sub_ps(tv, xv), vi));
    acc = _mm256_add_pd(_mm256_add_pd(acc, lo_pd256(k)), hi_pd256(k));
  }
  double w = hsum256d(acc);
  for (; v < V; ++v)
    w += static_cast<double>(std::exp(t[v] * inv_t - lse_q)) * ((t[v] - x[v]) * inv_t);
  return w;
}

double logsumexp_scaled(const float* x, int64_t V, double s) {
  double m = -INFINITY, sum = 0;
  for (int64_t v = 0; v < V; ++v) m = std::max(m, x[v] * s);
  for (int64_t v = 0; v < V; ++v) sum += std::exp(x[v] * s - m);
  return m + std::log(sum);
}
}  // namespace

void softmax_distill_stats(double* stats, const float* logits, const float* teacher,
                           const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                           int64_t v0, int64_t vocab_total, double temperature) {
  const double inv_t = 1.0 / temperature;
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    double* st = stats + kDistillStats * i;
    const int32_t y = targets[i];
    std::fill(st, st + kDistillStats, 0.0);
    if (y == ignore_index || !check.ok(targets, i, vocab_total)) continue;
    const float *x = logits + i * V, *t = teacher + i * V;
    st[0] = lse_of(x, V);
    if (has_avx2()) {
      const float s = static_cast<float>(inv_t);
      st[1] = row_logsumexp_avx2(x, V, s);
      st[2] = row_logsumexp_avx2(t, V, s);
      st[3] = distill_part_avx2(x, t, V, s, static_cast<float>(st[2]));
    } else {
      st[1] = logsumexp_scaled(x, V, inv_t);
      st[2] = logsumexp_scaled(t, V, inv_t);
      for (int64_t v = 0; v < V; ++v)
        st[3] += std::exp(t[v] * inv_t - st[2]) * (static_cast<double>(t[v]) - x[v]) * inv_t;
    }
    if (y >= v0 && y < v0 + V) st[4] = x[y - v0];
  }
  check.raise(targets, "target", vocab_total);
}

void softmax_distill_parallel(float* losses, float* kl, float* dlogits, const float* logits,
                              const float* teacher, const int32_t* targets, const double* all_stats,
                              int64_t P, float dloss, int64_t N, int64_t r0, int64_t n, int64_t V,
                              int32_t ignore_index, double alpha, double temperature, int64_t v0) {
  const double inv_t = 1.0 / temperature;
#pragma omp parallel for schedule(static)
  for (int64_t i = r0; i < r0 + n; ++i) {
    const int32_t y = targets[i];
    const float *x = logits + i * V, *t = teacher + i * V;
    float* d = dlogits ? dlogits + (i - r0) * V : nullptr;
    if (y == ignore_index) {  // (the statistics checked the targets)
      losses[i] = kl[i] = 0.0f;
      if (d) std::fill(d, d + V, 0.0f);
      continue;
    }
    const DistillRow r = distill_combine(all_stats, P, N, i);
    kl[i] = static_cast<float>(r.kl);
    losses[i] = static_cast<float>((1 - alpha) * r.ce + alpha * temperature * temperature * r.kl);
    if (!d) continue;
    // d/dx_v of (1 - a) CE + a T^2 KL = (1 - a)(p_v - [v == y]) + a T (p^T_v - q_v), as the whole
    // vocabulary's kernel writes it.
    const float ca = static_cast<float>(dloss * (1 - alpha));
    if (has_avx2()) {
      distill_row_avx2(d, x, t, V, static_cast<float>(inv_t), static_cast<float>(r.lse),
                       static_cast<float>(r.lse_u), static_cast<float>(r.lse_q), ca,
                       static_cast<float>(dloss * alpha * temperature));
      if (y >= v0 && y < v0 + V) d[y - v0] -= ca;
      continue;
    }
    for (int64_t v = 0; v < V; ++v) {
      const double xv = x[v];
      const double g =
          (1 - alpha) * (std::exp(xv - r.lse) - (v + v0 == y ? 1.0 : 0.0)) +
          alpha * temperature * (std::exp(xv * inv_t - r.lse_u) - std::exp(t[v] * inv_t - r.lse_q));
      d[v] = static_cast<float>(dloss * g);
    }
  }
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
