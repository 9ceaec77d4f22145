// Causal scaled dot-product attention (Vaswani et al. 2017) with grouped-query heads
// (Ainslie et al. 2023) and an optional sliding window (Mistral, Phi-3): with window W > 0, query
// t attends to keys (t - W, t], as Hugging Face's sliding-window mask. Per (batch, head): S = Q K^T
// / sqrt(HS) through gemm, causal softmax in double, O = P V. The full (T, T) probabilities are
// kept for backward; a flash-style recompute belongs to the speed issue. Backward is parallel over
// (batch, kv head) so the heads sharing a kv head add into dK/dV in a fixed order without races.
#include <omp.h>

#include <cmath>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

namespace {
// The first key position query t may see.
inline int64_t first_key(int64_t t, int64_t window) {
  return window > 0 && t >= window ? t - window + 1 : 0;
}
}  // namespace

template <typename T>
void attention_forward(T* out, T* probs, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                       int64_t NKV, int64_t HS, int64_t window) {
  const int64_t Cq = (NH + 2 * NKV) * HS, Co = NH * HS, group = NH / NKV;
  const T scale = T(1) / std::sqrt(T(HS));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const T* q = qkv + b * T_ * Cq + h * HS;
      const T* k = qkv + b * T_ * Cq + (NH + h / group) * HS;
      const T* v = qkv + b * T_ * Cq + (NH + NKV + h / group) * HS;
      T* p = probs + (b * NH + h) * T_ * T_;
      gemm<T>(false, true, T_, T_, HS, scale, q, Cq, k, Cq, T(0), p, T_);
      for (int64_t t = 0; t < T_; ++t) {
        T* row = p + t * T_;
        const int64_t lo = first_key(t, window);
        T mx = row[lo];
        for (int64_t j = lo + 1; j <= t; ++j) mx = std::max(mx, row[j]);
        double sum = 0;
        for (int64_t j = lo; j <= t; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        T inv = static_cast<T>(1.0 / sum);
        for (int64_t j = 0; j < lo; ++j) row[j] = T(0);
        for (int64_t j = lo; j <= t; ++j) row[j] *= inv;
        for (int64_t j = t + 1; j < T_; ++j) row[j] = T(0);
      }
      gemm<T>(false, false, T_, HS, T_, T(1), p, T_, v, Cq, T(0), out + b * T_ * Co + h * HS, Co);
    }
}

template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* probs, int64_t B,
                        int64_t T_, int64_t NH, int64_t NKV, int64_t HS, int64_t window) {
  const int64_t Cq = (NH + 2 * NKV) * HS, Co = NH * HS, group = NH / NKV;
  const T scale = T(1) / std::sqrt(T(HS));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < NKV; ++kvh) {
      T* ds = scratch + omp_get_thread_num() * T_ * T_;
      const T* base = qkv + b * T_ * Cq;
      T* dbase = dqkv + b * T_ * Cq;
      const T* k = base + (NH + kvh) * HS;
      const T* v = base + (NH + NKV + kvh) * HS;
      T* dk = dbase + (NH + kvh) * HS;
      T* dv = dbase + (NH + NKV + kvh) * HS;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const T* q = base + h * HS;
        T* dq = dbase + h * HS;
        const T* p = probs + (b * NH + h) * T_ * T_;
        const T* dO = dout + b * T_ * Co + h * HS;
        // dV += P^T dO; dP = dO V^T
        gemm<T>(true, false, T_, HS, T_, T(1), p, T_, dO, Co, T(1), dv, Cq);
        gemm<T>(false, true, T_, T_, HS, T(1), dO, Co, v, Cq, T(0), ds, T_);
        // dS = P * (dP - rowsum(P * dP)); masked entries have P = 0 and so dS = 0.
        for (int64_t t = 0; t < T_; ++t) {
          const T* pr = p + t * T_;
          T* dr = ds + t * T_;
          const int64_t lo = first_key(t, window);
          double dot = 0;
          for (int64_t j = lo; j <= t; ++j) dot += static_cast<double>(pr[j]) * dr[j];
          for (int64_t j = 0; j < lo; ++j) dr[j] = T(0);
          for (int64_t j = lo; j <= t; ++j) dr[j] = pr[j] * (dr[j] - static_cast<T>(dot));
          for (int64_t j = t + 1; j < T_; ++j) dr[j] = T(0);
        }
        // dQ += scale dS K; dK += scale dS^T Q
        gemm<T>(false, false, T_, HS, T_, scale, ds, T_, k, Cq, T(1), dq, Cq);
        gemm<T>(true, false, T_, HS, T_, scale, ds, T_, q, Cq, T(1), dk, Cq);
      }
    }
}

void attention_decode(float* out, const float* q, int64_t q_stride, const float* kcache,
                      const float* vcache, int64_t n, int64_t pos0, int64_t T_max, int64_t NH,
                      int64_t NKV, int64_t HS, int64_t window) {
  const int64_t group = NH / NKV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HS));
#pragma omp parallel
  {
    std::vector<float> att(pos0 + n);  // per thread, per generate call: not a training step
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < NH; ++h) {
        const float* qh = q + i * q_stride + h * HS;
        const float* K = kcache + (h / group) * T_max * HS;
        const float* Vc = vcache + (h / group) * T_max * HS;
        const int64_t len = pos0 + i + 1, lo = first_key(pos0 + i, window);
        float mx = -INFINITY;
        for (int64_t j = lo; j < len; ++j) {
          float s = 0;
          for (int64_t d = 0; d < HS; ++d) s += qh[d] * K[j * HS + d];
          att[j] = s * scale;
          mx = std::max(mx, att[j]);
        }
        double sum = 0;
        for (int64_t j = lo; j < len; ++j) {
          att[j] = std::exp(att[j] - mx);
          sum += att[j];
        }
        float* o = out + i * NH * HS + h * HS;
        for (int64_t d = 0; d < HS; ++d) o[d] = 0;
        for (int64_t j = lo; j < len; ++j) {
          float w = static_cast<float>(att[j] / sum);
          for (int64_t d = 0; d < HS; ++d) o[d] += w * Vc[j * HS + d];
        }
      }
  }
}

template void attention_forward<float>(float*, float*, const float*, int64_t, int64_t, int64_t,
                                       int64_t, int64_t, int64_t);
template void attention_forward<double>(double*, double*, const double*, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, int64_t);
template void attention_backward<float>(float*, float*, const float*, const float*, const float*,
                                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template void attention_backward<double>(double*, double*, const double*, const double*,
                                         const double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                         int64_t);

}  // namespace lmforge::cpu
