// Softmax cross-entropy over the vocabulary with an ignore index (as torch's
// F.cross_entropy(ignore_index=...)). logsumexp is accumulated in double.
#include <cmath>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/error.h"

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
}  // namespace

template <typename T>
void softmax_xent_forward(T* losses, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                          int32_t ignore_index, double* lse_sq_sum) {
  double zsum = 0;
#pragma omp parallel for schedule(static) reduction(+ : zsum)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    if (y == ignore_index) {
      losses[i] = T(0);
      continue;
    }
    LMF_CHECK(y >= 0 && y < V, "target {} outside vocabulary of {}", y, V);
    const T* x = logits + i * V;
    double lse = row_logsumexp(x, V);
    losses[i] = static_cast<T>(lse - x[y]);
    zsum += lse * lse;
  }
  if (lse_sq_sum) *lse_sq_sum = zsum;
}

template <typename T>
void softmax_xent_backward(T* dlogits, const T* logits, const int32_t* targets, T dloss, int64_t N,
                           int64_t V, int32_t ignore_index, double z_loss) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    int32_t y = targets[i];
    const T* x = logits + i * V;
    T* d = dlogits + i * V;
    if (y == ignore_index) {
      for (int64_t v = 0; v < V; ++v) d[v] = T(0);
      continue;
    }
    double lse = row_logsumexp(x, V);  // read x fully before d (which may alias it) is written
    // d(lse - x_y + z lse^2) / dx_v = p_v (1 + 2 z lse) - [v == y]
    double zf = 1.0 + 2.0 * z_loss * lse;
    for (int64_t v = 0; v < V; ++v) {
      double p = std::exp(static_cast<double>(x[v]) - lse);
      d[v] = static_cast<T>(dloss * (p * zf - (v == y ? 1.0 : 0.0)));
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

}  // namespace lmforge::cpu
