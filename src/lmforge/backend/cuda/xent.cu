// Softmax cross-entropy over rows of logits (with z-loss), forward and backward.
#include <type_traits>

#include "lmforge/backend/cuda/device.cuh"
#include "lmforge/backend/distill_stats.h"

namespace lmforge::cuda {

using namespace detail;

namespace {

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy: one block per row. Each thread keeps an online (max, sum of exp(x -
// max)) in fp32 over its columns (Milakov & Gimelshein 2018), the block combines them in a
// fixed tree, and lse = max + log(sum) in double. Rows are read as float4 between an unaligned
// head and tail (V is usually odd).

constexpr int kXentThreads = 512;

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ void push(MaxSum& a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;  // expf(-inf) = 0 for the first element
    a.m = x;
  } else if (x != -INFINITY) {  // a -inf logit adds nothing (and -inf - -inf would be NaN)
    a.s += expf(x - a.m);
  }
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// f(v, x[v]) for the columns of a row of V that this thread owns.
template <typename F>
__device__ __forceinline__ void for_row(const float* x, int64_t V, F&& f) {
  const int64_t head =
      min(V, static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / 4);
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) f(v, x[v]);
  const int64_t nvec = (V - head) / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x + head);
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const float4 q = x4[j];
    const int64_t v = head + 4 * j;
    f(v, q.x);
    f(v + 1, q.y);
    f(v + 2, q.z);
    f(v + 3, q.w);
  }
  for (int64_t v = head + 4 * nvec + threadIdx.x; v < V; v += blockDim.x) f(v, x[v]);
}

// d[v] = f(v, x[v]) over a row; d may alias x (each element is read and written by one thread).
template <typename F>
__device__ __forceinline__ void map_row(float* d, const float* x, int64_t V, F&& f) {
  if (((reinterpret_cast<uintptr_t>(d) ^ reinterpret_cast<uintptr_t>(x)) & 15) != 0) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = f(v, x[v]);
    return;
  }
  const int64_t head =
      min(V, static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / 4);
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) d[v] = f(v, x[v]);
  const int64_t nvec = (V - head) / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x + head);
  float4* d4 = reinterpret_cast<float4*>(d + head);
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const float4 q = x4[j];
    const int64_t v = head + 4 * j;
    d4[j] = make_float4(f(v, q.x), f(v + 1, q.y), f(v + 2, q.z), f(v + 3, q.w));
  }
  for (int64_t v = head + 4 * nvec + threadIdx.x; v < V; v += blockDim.x) d[v] = f(v, x[v]);
}

// logsumexp of a row (times scale), the same value in every thread (all threads of the block
// must call; a second call needs a __syncthreads() between).
__device__ double row_logsumexp(const float* x, int64_t V, float scale = 1.0f) {
  __shared__ MaxSum part[kXentThreads / 32];
  MaxSum a{-INFINITY, 0.0f};
  for_row(x, V, [&](int64_t, float xv) { push(a, xv * scale); });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const MaxSum b{__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o)};
    a = combine(a, b);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < kXentThreads / 32 ? part[lane] : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const MaxSum b{__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o)};
      a = combine(a, b);
    }
    if (lane == 0) part[0] = a;
  }
  __syncthreads();
  a = part[0];
  return static_cast<double>(a.m) + log(static_cast<double>(a.s));
}

__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_forward_kernel(float* losses, double* lse_sq, const float* logits, int64_t ldx,
                                const int32_t* targets, int64_t V, int32_t ignore_index) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  if (y == ignore_index) {  // the whole block
    if (threadIdx.x == 0) {
      losses[i] = 0.0f;
      if (lse_sq) lse_sq[i] = 0.0;
    }
    return;
  }
  const float* x = logits + i * ldx;
  const double lse = row_logsumexp(x, V);
  if (threadIdx.x == 0) {
    const bool valid = y >= 0 && y < V;
    losses[i] = valid ? static_cast<float>(lse - x[y]) : __int_as_float(0x7fc00000);
    if (lse_sq) lse_sq[i] = valid ? lse * lse : __longlong_as_double(0x7ff8000000000000LL);
  }
}

// Row i's gradient, written to d (float: may alias x; uint16_t: rounded to bf16) from its lse.
template <typename O>
__device__ __forceinline__ void write_grad_row(O* d, const float* x, int64_t V, int32_t y,
                                               double lse, float dloss, double z_loss) {
  const double zf = 1.0 + 2.0 * z_loss * lse;
  const bool valid = y >= 0 && y < V;
  const float lse_f = static_cast<float>(lse), coef = static_cast<float>(dloss * zf);
  auto g = [&](int64_t v, float xv) {
    if (!valid) return __int_as_float(0x7fc00000);
    if (v == y) return static_cast<float>(dloss * (exp(static_cast<double>(xv) - lse) * zf - 1.0));
    return expf(xv - lse_f) * coef;
  };
  if constexpr (std::is_same_v<O, float>)
    map_row(d, x, V, g);
  else
    for_row(x, V, [&](int64_t v, float xv) { d[v] = bf16_ftz(g(v, xv)); });
}

// Final-logit soft-capping, one block per row: x = cap tanh(x / cap); and its backward dx =
// dy (1 - (y / cap)^2) (dx float: may be dy or y; uint16_t: bf16 rows ldd apart, rounded once).
__global__ void __launch_bounds__(kXentThreads) softcap_kernel(float* x, int64_t V, float cap) {
  float* r = x + blockIdx.x * V;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) r[v] = cap * tanhf(r[v] / cap);
}

template <typename O>
__global__ void __launch_bounds__(kXentThreads)
    softcap_grad_kernel(O* dx, int64_t ldd, const float* dy, const float* y, int64_t V, float cap) {
  const int64_t i = blockIdx.x;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float t = y[i * V + v] / cap, g = dy[i * V + v] * (1.0f - t * t);
    if constexpr (std::is_same_v<O, float>)
      dx[i * ldd + v] = g;
    else
      dx[i * ldd + v] = bf16_ftz(g);
  }
}

template <typename O>
__device__ __forceinline__ void zero_row(O* d, const float* x, int64_t V) {
  if constexpr (std::is_same_v<O, float>)
    map_row(d, x, V, [](int64_t, float) { return 0.0f; });
  else
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = 0;
}

// Forward and backward of a row from one logsumexp (training): the loss and lse^2 as the forward
// kernel (unless losses is null: the backward alone), then the gradient. d(lse - x_y + z lse^2) /
// dx_v = p_v (1 + 2 z lse) - [v == y]. In place is safe: row_logsumexp reads the whole row before
// its block syncs, thread 0 reads x[y] before the sync below, and each element is then read and
// written by one thread. O: float (in place allowed), or uint16_t: bf16 rows ld apart.
template <typename O>
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_fused_kernel(float* losses, double* lse_sq, O* dlogits, int64_t ld,
                              const float* logits, int64_t ldx, const int32_t* targets, float dloss,
                              int64_t V, int32_t ignore_index, double z_loss,
                              const float* row_scale) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  const float* x = logits + i * ldx;
  O* d = dlogits + i * ld;
  if (y == ignore_index) {
    if (losses && threadIdx.x == 0) {
      losses[i] = 0.0f;
      if (lse_sq) lse_sq[i] = 0.0;
    }
    zero_row(d, x, V);
    return;
  }
  const double lse = row_logsumexp(x, V);
  const bool valid = y >= 0 && y < V;
  if (losses && threadIdx.x == 0) {
    losses[i] = valid ? static_cast<float>(lse - x[y]) : __int_as_float(0x7fc00000);
    if (lse_sq) lse_sq[i] = valid ? lse * lse : __longlong_as_double(0x7ff8000000000000LL);
  }
  __syncthreads();  // x[y] is read before its thread's block overwrites it (in place)
  write_grad_row(d, x, V, y, lse, row_scale ? dloss * row_scale[i] : dloss, z_loss);
}

// A distillation row's log-sum-exps: of the student's logits x, of x / T and of the teacher's t / T
// (inv_t = 1 / T); every thread of the block calls it.
struct DistillLses {
  double x, x_t, t_t;
};
__device__ DistillLses distill_lses(const float* x, const float* t, int64_t V, float inv_t) {
  DistillLses r;
  r.x = row_logsumexp(x, V);
  __syncthreads();
  r.x_t = row_logsumexp(x, V, inv_t);
  __syncthreads();
  r.t_t = row_logsumexp(t, V, inv_t);
  return r;
}

// Knowledge distillation: one block per row, as softmax_distill_forward_backward documents.
template <typename O>
__global__ void __launch_bounds__(kXentThreads)
    softmax_distill_kernel(float* losses, float* kl, O* dlogits, int64_t ld, const float* logits,
                           int64_t ldx, const float* teacher, int64_t ldt, const int32_t* targets,
                           float dloss, int64_t V, int32_t ignore_index, double alpha,
                           double temperature) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  const float* x = logits + i * ldx;
  const float* t = teacher + i * ldt;
  O* d = dlogits + i * ld;
  if (y == ignore_index) {
    if (threadIdx.x == 0) losses[i] = kl[i] = 0.0f;
    zero_row(d, x, V);
    return;
  }
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto [lse, lse_s, lse_t] = distill_lses(x, t, V, inv_t);
  double part = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const double log_q = t[v] * inv_t - lse_t, log_ps = x[v] * inv_t - lse_s;
    part += exp(log_q) * (log_q - log_ps);
  }
  const double kl_sum = block_sum(part);
  const bool valid = y >= 0 && y < V;
  if (threadIdx.x == 0) {
    const double ce = valid ? lse - x[y] : 0.0;
    kl[i] = valid ? static_cast<float>(kl_sum) : __int_as_float(0x7fc00000);
    losses[i] =
        valid ? static_cast<float>((1 - alpha) * ce + alpha * temperature * temperature * kl_sum)
              : __int_as_float(0x7fc00000);
  }
  __syncthreads();  // x[y] is read before its thread overwrites it (in place)
  const float lse_f = static_cast<float>(lse), lse_sf = static_cast<float>(lse_s),
              lse_tf = static_cast<float>(lse_t);
  const float a = static_cast<float>(1 - alpha), b = static_cast<float>(alpha * temperature);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float xv = x[v];
    float g = a * (expf(xv - lse_f) - (v == y ? 1.0f : 0.0f)) +
              b * (expf(xv * inv_t - lse_sf) - expf(t[v] * inv_t - lse_tf));
    g = valid ? dloss * g : __int_as_float(0x7fc00000);
    if constexpr (std::is_same_v<O, float>)
      d[v] = g;
    else
      d[v] = bf16_ftz(g);
  }
}

// Vocabulary parallelism: one block per row. The statistics of this rank's columns (their
// logsumexp, as (m, s) = (lse, 1), and the target's logit where it is one of them).
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_stats_kernel(double* stats, const float* logits, int64_t ldx,
                              const int32_t* targets, int64_t V, int32_t ignore_index, int64_t v0,
                              int64_t Vt) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  double* st = stats + 3 * i;
  if (y == ignore_index) {
    if (threadIdx.x == 0) st[0] = st[1] = st[2] = 0.0;
    return;
  }
  const float* x = logits + i * ldx;
  const double lse = row_logsumexp(x, V);
  if (threadIdx.x == 0) {
    const bool valid = y >= 0 && y < Vt, here = y >= v0 && y < v0 + V;
    st[0] = lse;
    st[1] = valid ? 1.0 : __longlong_as_double(0x7ff8000000000000LL);  // NaN: see kernels.h
    st[2] = valid && here ? static_cast<double>(x[y - v0]) : 0.0;
  }
}

// From every rank's statistics (P x N x 3): the row's lse and loss, and the gradient of this
// rank's columns, p_v (1 + 2 z lse) - [v + v0 == y] (times dloss and the row's scale). The target
// logit comes from the statistics, so writing in place needs no ordering.
template <typename O>
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_parallel_kernel(float* losses, double* lse_sq, O* dlogits, int64_t ld,
                                 const float* logits, int64_t ldx, const int32_t* targets,
                                 const double* all_stats, int64_t P, int64_t N, float dloss,
                                 int64_t V, int32_t ignore_index, double z_loss, int64_t v0,
                                 const float* row_scale) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  const float* x = logits + i * ldx;
  O* d = dlogits ? dlogits + i * ld : nullptr;
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      losses[i] = 0.0f;
      if (lse_sq) lse_sq[i] = 0.0;
    }
    if (d) zero_row(d, x, V);
    return;
  }
  double M = -INFINITY, xy = 0, S = 0;
  for (int64_t k = 0; k < P; ++k) {
    M = fmax(M, all_stats[(k * N + i) * 3]);
    xy += all_stats[(k * N + i) * 3 + 2];
  }
  for (int64_t k = 0; k < P; ++k) {
    const double* st = all_stats + (k * N + i) * 3;
    S += st[1] * exp(st[0] - M);
  }
  const double lse = M + log(S);
  if (threadIdx.x == 0) {
    losses[i] = static_cast<float>(lse - xy);
    if (lse_sq) lse_sq[i] = lse * lse;
  }
  if (!d) return;
  const float dl = row_scale ? dloss * row_scale[i] : dloss;
  const double zf = 1.0 + 2.0 * z_loss * lse;
  const float lse_f = static_cast<float>(lse), coef = static_cast<float>(dl * zf);
  const int64_t yl = static_cast<int64_t>(y) - v0;  // the target's column here, if any
  auto g = [&](int64_t v, float xv) {
    if (v == yl) return static_cast<float>(dl * (exp(static_cast<double>(xv) - lse) * zf - 1.0));
    return expf(xv - lse_f) * coef;
  };
  if constexpr (std::is_same_v<O, float>)
    map_row(d, x, V, g);
  else
    for_row(x, V, [&](int64_t v, float xv) { d[v] = bf16_ftz(g(v, xv)); });
}

// Distillation over a vocabulary split by columns (backend/distill_stats.h): one block per row,
// this rank's columns' statistics.
__global__ void __launch_bounds__(kXentThreads)
    softmax_distill_stats_kernel(double* stats, const float* logits, int64_t ldx,
                                 const float* teacher, int64_t ldt, const int32_t* targets,
                                 int64_t V, int32_t ignore_index, int64_t v0, int64_t Vt,
                                 double temperature) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  double* st = stats + kDistillStats * i;
  if (y == ignore_index) {
    if (threadIdx.x < kDistillStats) st[threadIdx.x] = 0.0;
    return;
  }
  const float* x = logits + i * ldx;
  const float* t = teacher + i * ldt;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto [lse, lse_u, lse_q] = distill_lses(x, t, V, inv_t);
  double part = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
    part += exp(t[v] * inv_t - lse_q) * (static_cast<double>(t[v]) - x[v]) * inv_t;
  const double w = block_sum(part);
  if (threadIdx.x == 0) {
    const bool valid = y >= 0 && y < Vt, here = y >= v0 && y < v0 + V;
    const double nan = __longlong_as_double(0x7ff8000000000000LL);  // see kernels.h
    st[0] = valid ? lse : nan;
    st[1] = lse_u;
    st[2] = lse_q;
    st[3] = w;
    st[4] = valid && here ? static_cast<double>(x[y - v0]) : 0.0;
  }
}

// From every rank's statistics: the row's loss and KL, and the gradient of this rank's columns.
template <typename O>
__global__ void __launch_bounds__(kXentThreads)
    softmax_distill_parallel_kernel(float* losses, float* kl, O* dlogits, int64_t ld,
                                    const float* logits, int64_t ldx, const float* teacher,
                                    int64_t ldt, const int32_t* targets, const double* all_stats,
                                    int64_t P, int64_t N, float dloss, int64_t V,
                                    int32_t ignore_index, double alpha, double temperature,
                                    int64_t v0) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  const float* x = logits + i * ldx;
  const float* t = teacher + i * ldt;
  O* d = dlogits ? dlogits + i * ld : nullptr;
  if (y == ignore_index) {
    if (threadIdx.x == 0) losses[i] = kl[i] = 0.0f;
    if (d) zero_row(d, x, V);
    return;
  }
  const DistillRow r = distill_combine(all_stats, P, N, i);
  if (threadIdx.x == 0) {  // (a target outside the vocabulary: NaN, as the whole vocabulary's)
    kl[i] = isnan(r.lse) ? __int_as_float(0x7fc00000) : static_cast<float>(r.kl);
    losses[i] = static_cast<float>((1 - alpha) * r.ce + alpha * temperature * temperature * r.kl);
  }
  if (!d) return;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float lse_f = static_cast<float>(r.lse), lse_uf = static_cast<float>(r.lse_u),
              lse_qf = static_cast<float>(r.lse_q);
  const float a = static_cast<float>(1 - alpha), b = static_cast<float>(alpha * temperature);
  const int64_t yl = static_cast<int64_t>(y) - v0;  // the target's column here, if any
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float xv = x[v];
    const float g = dloss * (a * (expf(xv - lse_f) - (v == yl ? 1.0f : 0.0f)) +
                             b * (expf(xv * inv_t - lse_uf) - expf(t[v] * inv_t - lse_qf)));
    if constexpr (std::is_same_v<O, float>)
      d[v] = g;  // (in place: each element read and written by one thread)
    else
      d[v] = bf16_ftz(g);
  }
}

}  // namespace

void softmax_distill_stats(double* stats, const float* logits, int64_t ldx, const float* teacher,
                           int64_t ldt, const int32_t* targets, int64_t N, int64_t V,
                           int32_t ignore_index, int64_t v0, int64_t vocab_total,
                           double temperature) {
  if (N <= 0) return;
  softmax_distill_stats_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      stats, logits, ldx > 0 ? ldx : V, teacher, ldt > 0 ? ldt : V, targets, V, ignore_index, v0,
      vocab_total, temperature);
  LMF_CUDA_LAUNCHED();
}

void softmax_distill_parallel(float* losses, float* kl, float* dlogits, uint16_t* dlogits16,
                              int64_t ld, const float* logits, int64_t ldx, const float* teacher,
                              int64_t ldt, const int32_t* targets, const double* all_stats,
                              int64_t P, float dloss, int64_t N, int64_t V, int32_t ignore_index,
                              double alpha, double temperature, int64_t v0) {
  if (N <= 0) return;
  if (ldx <= 0) ldx = V;
  if (ldt <= 0) ldt = V;
  if (dlogits16)
    softmax_distill_parallel_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
        losses, kl, dlogits16, ld, logits, ldx, teacher, ldt, targets, all_stats, P, N, dloss, V,
        ignore_index, alpha, temperature, v0);
  else  // (fp32: in place, the logits' rows; or none)
    softmax_distill_parallel_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
        losses, kl, dlogits, ldx, logits, ldx, teacher, ldt, targets, all_stats, P, N, dloss, V,
        ignore_index, alpha, temperature, v0);
  LMF_CUDA_LAUNCHED();
}

void softmax_xent_stats(double* stats, const float* logits, const int32_t* targets, int64_t N,
                        int64_t V, int32_t ignore_index, int64_t v0, int64_t vocab_total,
                        int64_t ldx) {
  if (N <= 0) return;
  softmax_xent_stats_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      stats, logits, ldx > 0 ? ldx : V, targets, V, ignore_index, v0,
      vocab_total > 0 ? vocab_total : V);
  LMF_CUDA_LAUNCHED();
}

void softmax_xent_parallel(float* losses, double* lse_sq_sum, float* dlogits, uint16_t* dlogits16,
                           int64_t ld, const float* logits, const int32_t* targets,
                           const double* all_stats, int64_t P, float dloss, int64_t N, int64_t V,
                           int32_t ignore_index, double z_loss, int64_t v0, const float* row_scale,
                           int64_t ldx) {
  if (N <= 0) {
    if (lse_sq_sum) LMF_CUDA(cudaMemsetAsync(lse_sq_sum, 0, sizeof(double), cur_stream()));
    return;
  }
  double* lse_sq = lse_sq_sum ? scratch(N) : nullptr;
  if (ldx <= 0) ldx = V;
  if (dlogits16)
    softmax_xent_parallel_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
        losses, lse_sq, dlogits16, ld, logits, ldx, targets, all_stats, P, N, dloss, V,
        ignore_index, z_loss, v0, row_scale);
  else  // (fp32: in place, the logits' rows)
    softmax_xent_parallel_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
        losses, lse_sq, dlogits, ldx, logits, ldx, targets, all_stats, P, N, dloss, V, ignore_index,
        z_loss, v0, row_scale);
  LMF_CUDA_LAUNCHED();
  if (lse_sq_sum) sum_partials(lse_sq_sum, lse_sq, N, false);
}

void softmax_distill_forward_backward(float* losses, float* kl, float* dlogits, uint16_t* dlogits16,
                                      int64_t ld, const float* logits, int64_t ldx,
                                      const float* teacher, int64_t ldt, const int32_t* targets,
                                      float dloss, int64_t N, int64_t V, int32_t ignore_index,
                                      double alpha, double temperature) {
  if (N <= 0) return;
  if (ldt <= 0) ldt = V;
  if (dlogits16)
    softmax_distill_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
        losses, kl, dlogits16, ld, logits, ldx, teacher, ldt, targets, dloss, V, ignore_index,
        alpha, temperature);
  else
    softmax_distill_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
        losses, kl, dlogits, ld, logits, ldx, teacher, ldt, targets, dloss, V, ignore_index, alpha,
        temperature);
  LMF_CUDA_LAUNCHED();
}

void softmax_xent_forward(float* losses, const float* logits, const int32_t* targets, int64_t N,
                          int64_t V, int32_t ignore_index, double* lse_sq_sum, int64_t ldx) {
  if (N <= 0) {
    if (lse_sq_sum) LMF_CUDA(cudaMemsetAsync(lse_sq_sum, 0, sizeof(double), cur_stream()));
    return;
  }
  double* lse_sq = lse_sq_sum ? scratch(N) : nullptr;
  softmax_xent_forward_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      losses, lse_sq, logits, ldx > 0 ? ldx : V, targets, V, ignore_index);
  LMF_CUDA_LAUNCHED();
  if (lse_sq_sum) sum_partials(lse_sq_sum, lse_sq, N, false);
}

void softmax_xent_backward(float* dlogits, const float* logits, const int32_t* targets, float dloss,
                           int64_t N, int64_t V, int32_t ignore_index, double z_loss) {
  if (N <= 0) return;
  softmax_xent_fused_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      nullptr, nullptr, dlogits, V, logits, V, targets, dloss, V, ignore_index, z_loss, nullptr);
  LMF_CUDA_LAUNCHED();
}

template <typename O>
void launch_fused(float* losses, double* lse_sq_sum, O* dlogits, int64_t ld, const float* logits,
                  int64_t ldx, const int32_t* targets, float dloss, int64_t N, int64_t V,
                  int32_t ignore_index, double z_loss, const float* row_scale) {
  if (N <= 0) {
    if (lse_sq_sum) LMF_CUDA(cudaMemsetAsync(lse_sq_sum, 0, sizeof(double), cur_stream()));
    return;
  }
  double* lse_sq = lse_sq_sum ? scratch(N) : nullptr;
  softmax_xent_fused_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      losses, lse_sq, dlogits, ld, logits, ldx, targets, dloss, V, ignore_index, z_loss, row_scale);
  LMF_CUDA_LAUNCHED();
  if (lse_sq_sum) sum_partials(lse_sq_sum, lse_sq, N, false);
}

void softmax_xent_forward_backward(float* losses, double* lse_sq_sum, float* dlogits,
                                   const float* logits, const int32_t* targets, float dloss,
                                   int64_t N, int64_t V, int32_t ignore_index, double z_loss,
                                   const float* row_scale) {
  launch_fused(losses, lse_sq_sum, dlogits, V, logits, V, targets, dloss, N, V, ignore_index,
               z_loss, row_scale);
}

void softmax_xent_forward_backward(float* losses, double* lse_sq_sum, uint16_t* dlogits, int64_t ld,
                                   const float* logits, const int32_t* targets, float dloss,
                                   int64_t N, int64_t V, int32_t ignore_index, double z_loss,
                                   int64_t ldx, const float* row_scale) {
  launch_fused(losses, lse_sq_sum, dlogits, ld, logits, ldx > 0 ? ldx : V, targets, dloss, N, V,
               ignore_index, z_loss, row_scale);
}

void softcap_rows(float* x, int64_t N, int64_t V, float cap) {
  if (N <= 0) return;
  softcap_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(x, V, cap);
  LMF_CUDA_LAUNCHED();
}

template <typename O>
void launch_softcap_grad(O* dx, int64_t ldd, const float* dy, const float* y, int64_t N, int64_t V,
                         float cap) {
  if (N <= 0) return;
  softcap_grad_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(dx, ldd, dy, y,
                                                                                   V, cap);
  LMF_CUDA_LAUNCHED();
}
void softcap_grad_rows(float* dx, int64_t ldd, const float* dy, const float* y, int64_t N,
                       int64_t V, float cap) {
  launch_softcap_grad(dx, ldd, dy, y, N, V, cap);
}
void softcap_grad_rows(uint16_t* dx, int64_t ldd, const float* dy, const float* y, int64_t N,
                       int64_t V, float cap) {
  launch_softcap_grad(dx, ldd, dy, y, N, V, cap);
}

void softmax_xent_backward(uint16_t* dlogits, int64_t ld, const float* logits,
                           const int32_t* targets, float dloss, int64_t N, int64_t V,
                           int32_t ignore_index, double z_loss) {
  if (N <= 0) return;
  softmax_xent_fused_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      nullptr, nullptr, dlogits, ld, logits, V, targets, dloss, V, ignore_index, z_loss, nullptr);
  LMF_CUDA_LAUNCHED();
}

}  // namespace lmforge::cuda
