// LayerNorm and RMSNorm, forward and backward (weight gradients as deterministic column sums).
#include "lmforge/backend/cuda/device.cuh"

namespace lmforge::cuda {

using namespace detail;

namespace {

// ---------------------------------------------------------------------------------------------
// Norms: one warp per row, row statistics in double (as the CPU). K = 4: C and the row starts
// are multiples of 4 and the pointers 16-byte aligned; lane l then owns columns 4 l + 128 j.

template <int K, typename O>
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_kernel(O* out, float* mean, float* rstd, const float* inp,
                             const float* weight, const float* bias, int64_t N, int64_t C,
                             double eps) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;  // the whole warp: no block-wide syncs here
  const float* x = inp + i * C;
  double sum = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> v = load<K>(x + c);
#pragma unroll
    for (int k = 0; k < K; ++k) sum += v.v[k];
  }
  const double m = warp_sum(sum) / C;
  double var = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> v = load<K>(x + c);
#pragma unroll
    for (int k = 0; k < K; ++k) var += (v.v[k] - m) * (v.v[k] - m);
  }
  var = warp_sum(var) / C;
  const double s = 1.0 / sqrt(var + eps);
  O* o = out + i * C;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    Floats<K> v = load<K>(x + c);
    const Floats<K> w = load<K>(weight + c);
    Floats<K> b;
    if (bias) {
      b = load<K>(bias + c);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) b.v[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < K; ++k)
      v.v[k] = __fadd_rn(__fmul_rn(static_cast<float>((v.v[k] - m) * s), w.v[k]), b.v[k]);
    store<K>(o + c, v);
  }
  if (lane == 0) {
    mean[i] = static_cast<float>(m);
    rstd[i] = static_cast<float>(s);
  }
}

// dinp += (dn - mean(dn) - n mean(dn n)) s, with n = (x - m) s and dn = w dout.
template <int K>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                              const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;
  const float* x = inp + i * C;
  const float* g = dout + i * C;
  const double m = mean[i], s = rstd[i];
  double dnorm_mean = 0, dnorm_norm_mean = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double n = (xv.v[k] - m) * s;
      const double dn = static_cast<double>(wv.v[k]) * gv.v[k];
      dnorm_mean += dn;
      dnorm_norm_mean += dn * n;
    }
  }
  dnorm_mean = warp_sum(dnorm_mean) / C;
  dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
  float* d = dinp + i * C;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
    Floats<K> dv = load<K>(d + c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double n = (xv.v[k] - m) * s;
      const double dn = static_cast<double>(wv.v[k]) * gv.v[k];
      dv.v[k] = __fadd_rn(dv.v[k], static_cast<float>((dn - dnorm_mean - n * dnorm_norm_mean) * s));
    }
    store<K>(d + c, dv);
  }
}

template <int K, typename O>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(O* out, float* rstd, const float* inp, const float* weight, int64_t N,
                           int64_t C, double eps, int64_t group, int64_t stride, float offset) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;
  const int64_t at = row_offset(i, C, group, stride);
  const float* x = inp + at;
  double ss = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> v = load<K>(x + c);
#pragma unroll
    for (int k = 0; k < K; ++k) ss += static_cast<double>(v.v[k]) * v.v[k];
  }
  const double s = 1.0 / sqrt(warp_sum(ss) / C + eps);
  O* o = out + at;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    Floats<K> v = load<K>(x + c);
    const Floats<K> w = load<K>(weight + c);
#pragma unroll
    for (int k = 0; k < K; ++k)
      v.v[k] = __fmul_rn(static_cast<float>(v.v[k] * s), __fadd_rn(w.v[k], offset));
    store<K>(o + c, v);
  }
  if (lane == 0) rstd[i] = static_cast<float>(s);
}

// dinp += s (dn - n mean(dn n)), with n = x s and dn = w dout.
template <int K>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                            const float* rstd, int64_t N, int64_t C, int64_t group, int64_t stride,
                            float offset) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;
  const int64_t at = row_offset(i, C, group, stride);
  const float* x = inp + at;
  const float* g = dout + at;
  const double s = rstd[i];
  double dot = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
#pragma unroll
    for (int k = 0; k < K; ++k)
      dot += static_cast<double>(__fadd_rn(wv.v[k], offset)) * gv.v[k] * xv.v[k] * s;
  }
  dot = warp_sum(dot) / C;
  float* d = dinp + at;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
    Floats<K> dv = load<K>(d + c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double n = xv.v[k] * s;
      dv.v[k] = __fadd_rn(
          dv.v[k], static_cast<float>(
                       s * (static_cast<double>(__fadd_rn(wv.v[k], offset)) * gv.v[k] - n * dot)));
    }
    store<K>(d + c, dv);
  }
}

// Weight (and bias) gradients of the norms: column sums over rows, deterministic. Rows are cut
// into chunks fixed by N alone (at most kColChunks); block (x, y) sums chunk y of columns
// [128 x, 128 x + 128), one column per thread (coalesced across the warp), in row order, into
// double partials; colsum_finish_kernel adds a column's partials in chunk order.
constexpr int kColThreads = 128;
constexpr int64_t kColChunks = 256, kColMinRows = 32;

int64_t col_rows_per_chunk(int64_t N) {
  return std::max(kColMinRows, (N + kColChunks - 1) / kColChunks);
}

// kLayer: partial = [dw chunks (chunks, C) | db chunks (chunks, C)]; else dw only (no mean).
template <bool kLayer>
__global__ void __launch_bounds__(kColThreads)
    norm_colsum_kernel(double* partial, const float* dout, const float* inp, const float* mean,
                       const float* rstd, int64_t N, int64_t C, int64_t group, int64_t stride,
                       int64_t rows) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t chunk = blockIdx.y, r0 = chunk * rows, r1 = min(N, r0 + rows);
  double dw = 0, db = 0;
#pragma unroll 4
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t at = row_offset(i, C, group, stride) + c;
    const double s = rstd[i];
    const float g = dout[at];
    if constexpr (kLayer) {
      dw += (inp[at] - static_cast<double>(mean[i])) * s * g;
      db += g;
    } else {
      dw += static_cast<double>(inp[at]) * s * g;
    }
  }
  partial[chunk * C + c] = dw;
  if constexpr (kLayer) partial[(gridDim.y + chunk) * C + c] = db;
}

__global__ void __launch_bounds__(kThreads)
    colsum_finish_kernel(float* dst, const double* partial, int64_t chunks, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double t = 0;
  for (int64_t k = 0; k < chunks; ++k) t += partial[k * C + c];
  dst[c] = __fadd_rn(dst[c], static_cast<float>(t));
}

// dweight (and dbias, when not null) += the column sums; group/stride as rmsnorm (1, C for
// layernorm). mean null: rmsnorm.
void norm_param_grads(float* dweight, float* dbias, const float* dout, const float* inp,
                      const float* mean, const float* rstd, int64_t N, int64_t C, int64_t group,
                      int64_t stride) {
  const int64_t rows = col_rows_per_chunk(N), chunks = (N + rows - 1) / rows;
  const bool layer = mean != nullptr;
  double* partial = scratch((layer ? 2 : 1) * chunks * C);
  const dim3 grid(static_cast<unsigned>((C + kColThreads - 1) / kColThreads),
                  static_cast<unsigned>(chunks));
  if (layer)
    norm_colsum_kernel<true><<<grid, kColThreads, 0, cur_stream()>>>(partial, dout, inp, mean, rstd,
                                                                     N, C, group, stride, rows);
  else
    norm_colsum_kernel<false><<<grid, kColThreads, 0, cur_stream()>>>(
        partial, dout, inp, mean, rstd, N, C, group, stride, rows);
  LMF_CUDA_LAUNCHED();
  const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  colsum_finish_kernel<<<blocks, kThreads, 0, cur_stream()>>>(dweight, partial, chunks, C);
  LMF_CUDA_LAUNCHED();
  if (layer && dbias) {
    colsum_finish_kernel<<<blocks, kThreads, 0, cur_stream()>>>(dbias, partial + chunks * C, chunks,
                                                                C);
    LMF_CUDA_LAUNCHED();
  }
}

unsigned row_blocks(int64_t N) {
  return static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
}

}  // namespace

namespace {

template <typename O>
void launch_layernorm_forward(O* out, float* mean, float* rstd, const float* inp,
                              const float* weight, const float* bias, int64_t N, int64_t C,
                              double eps) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && aligned16(out, inp, weight, bias))
    layernorm_forward_kernel<4><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, mean, rstd, inp, weight, bias, N, C, eps);
  else
    layernorm_forward_kernel<1><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, mean, rstd, inp, weight, bias, N, C, eps);
  LMF_CUDA_LAUNCHED();
}

template <typename O>
void launch_rmsnorm_forward(O* out, float* rstd, const float* inp, const float* weight, int64_t N,
                            int64_t C, double eps, int64_t group, int64_t stride, float offset) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && stride % 4 == 0 && aligned16(out, inp, weight))
    rmsnorm_forward_kernel<4><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, rstd, inp, weight, N, C, eps, group, stride, offset);
  else
    rmsnorm_forward_kernel<1><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, rstd, inp, weight, N, C, eps, group, stride, offset);
  LMF_CUDA_LAUNCHED();
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, double eps) {
  launch_layernorm_forward(out, mean, rstd, inp, weight, bias, N, C, eps);
}

void layernorm_forward(uint16_t* out, float* mean, float* rstd, const float* inp,
                       const float* weight, const float* bias, int64_t N, int64_t C, double eps) {
  launch_layernorm_forward(out, mean, rstd, inp, weight, bias, N, C, eps);
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd,
                        int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && aligned16(dinp, dout, inp, weight))
    layernorm_backward_kernel<4>
        <<<row_blocks(N), kThreads, 0, cur_stream()>>>(dinp, dout, inp, weight, mean, rstd, N, C);
  else
    layernorm_backward_kernel<1>
        <<<row_blocks(N), kThreads, 0, cur_stream()>>>(dinp, dout, inp, weight, mean, rstd, N, C);
  LMF_CUDA_LAUNCHED();
  if (dweight) norm_param_grads(dweight, dbias, dout, inp, mean, rstd, N, C, 1, C);  // else frozen
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, double eps, int64_t group, int64_t stride, float offset) {
  launch_rmsnorm_forward(out, rstd, inp, weight, N, C, eps, group, stride, offset);
}

void rmsnorm_forward(uint16_t* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, double eps, int64_t group, int64_t stride, float offset) {
  launch_rmsnorm_forward(out, rstd, inp, weight, N, C, eps, group, stride, offset);
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C, int64_t group,
                      int64_t stride, float offset) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && stride % 4 == 0 && aligned16(dinp, dout, inp, weight))
    rmsnorm_backward_kernel<4><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        dinp, dout, inp, weight, rstd, N, C, group, stride, offset);
  else
    rmsnorm_backward_kernel<1><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        dinp, dout, inp, weight, rstd, N, C, group, stride, offset);
  LMF_CUDA_LAUNCHED();
  if (dweight) norm_param_grads(dweight, nullptr, dout, inp, nullptr, rstd, N, C, group, stride);
}

}  // namespace lmforge::cuda
