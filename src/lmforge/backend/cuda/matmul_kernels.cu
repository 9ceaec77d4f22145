// The small kernels around cuBLASLt (matmul.cpp): fp32 -> bf16 conversion, row fills and scales
// for the degenerate K = 0 gemm and the bias fallback, a plain tiled gemm for operands cuBLASLt
// has no algorithm for, and the bias gradient as a deterministic two-pass column sum. All
// launched on cuda::stream(); 64-bit indices throughout.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"

namespace lmforge::cuda {

namespace {

constexpr int kThreads = 256;

cudaStream_t cur_stream() { return static_cast<cudaStream_t>(stream()); }

// Blocks for a grid-stride loop over n items: enough to fill an H100 several times over.
unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 8192));
}

// fp32_to_bf16_ftz (core/dtype.h) on the device: denormals to signed zero, NaN stays a quiet NaN,
// everything else rounded to nearest even (overflow rounds to inf). Bit-identical to the CPU.
__device__ __forceinline__ uint16_t bf16_rne_ftz(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__global__ void to_bf16_kernel(uint16_t* __restrict__ dst, const float* __restrict__ src,
                               int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = bf16_rne_ftz(src[i]);
}

__global__ void from_bf16_kernel(float* __restrict__ dst, const uint16_t* __restrict__ src,
                                 int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = __uint_as_float(static_cast<uint32_t>(src[i]) << 16);
}

__global__ void keep_master_kernel(float* __restrict__ master, const uint16_t* __restrict__ value,
                                   int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    if (bf16_rne_ftz(master[i]) != value[i])
      master[i] = __uint_as_float(static_cast<uint32_t>(value[i]) << 16);
}

__global__ void to_bf16_rows_kernel(uint16_t* __restrict__ dst, int64_t ld,
                                    const float* __restrict__ src, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[(i / cols) * ld + i % cols] = bf16_rne_ftz(src[i]);
}

__global__ void fill_rows_kernel(float* __restrict__ C, int64_t M, int64_t N, int64_t ldc,
                                 const float* __restrict__ bias) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / N, c = i % N;
    C[r * ldc + c] = bias ? bias[c] : 0.0f;
  }
}

__global__ void scale_rows_kernel(float* __restrict__ C, int64_t M, int64_t N, int64_t ldc,
                                  float beta) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / N, c = i % N;
    C[r * ldc + c] = beta == 0.0f ? 0.0f : beta * C[r * ldc + c];
  }
}

// Bias gradient, pass 1. Block (32, 8) owns 32 columns of one chunk of rows: thread (x, y) sums
// column x over rows y, y + 8, ... of the chunk in double (a warp reads 32 consecutive floats of
// a row: coalesced), then thread y = 0 adds the 8 partials in y order. Every sum's order depends
// on the shapes only.
constexpr int kBgCols = 32, kBgRows = 8;

__device__ __forceinline__ double widen(float x) { return x; }
__device__ __forceinline__ double widen(uint16_t x) {
  return __uint_as_float(static_cast<uint32_t>(x) << 16);
}

template <typename D>  // float, or uint16_t for a bf16 dout
__global__ void bias_grad_partial_kernel(double* __restrict__ partial, const D* __restrict__ dout,
                                         int64_t N, int64_t OC, int64_t ld,
                                         int64_t rows_per_chunk) {
  __shared__ double red[kBgRows][kBgCols];
  const int64_t col = blockIdx.x * int64_t(kBgCols) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  double acc = 0;
  if (col < OC)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBgRows) acc += widen(dout[r * ld + col]);
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < OC) {
    double s = 0;
    for (int y = 0; y < kBgRows; ++y) s += red[y][threadIdx.x];
    partial[chunk * OC + col] = s;
  }
}

// Pass 2: one thread per column adds its chunks' partials in chunk order.
__global__ void bias_grad_finish_kernel(float* __restrict__ dbias,
                                        const double* __restrict__ partial, int64_t OC,
                                        int64_t chunks) {
  for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < OC;
       col += int64_t(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * OC + col];
    dbias[col] += static_cast<float>(s);
  }
}

// The fallback gemm: a 16 x 16 block computes a 16 x 16 tile of C, staging 16-wide slices of
// op(A) and op(B) in shared memory; each thread sums its k in order in fp32. Row tiles beyond
// the grid's y extent (65535) are walked by a loop.
constexpr int kFb = 16;

template <bool kBf16>
__device__ __forceinline__ float load_operand(const void* p, int64_t i) {
  if constexpr (kBf16)
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
  else
    return static_cast<const float*>(p)[i];
}

template <bool kBf16>
__global__ void gemm_fallback_kernel(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                                     const void* __restrict__ A, int64_t lda,
                                     const void* __restrict__ B, int64_t ldb, float beta,
                                     float* __restrict__ C, int64_t ldc,
                                     const float* __restrict__ bias) {
  __shared__ float As[kFb][kFb + 1], Bs[kFb][kFb + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = blockIdx.x * int64_t(kFb) + tx;
  const int64_t row_tiles = (M + kFb - 1) / kFb;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row = rt * kFb + ty;
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kFb) {
      const int64_t ka = k0 + tx, kb = k0 + ty;  // As[ty][tx] = op(A)(row, ka)
      As[ty][tx] =
          row < M && ka < K ? load_operand<kBf16>(A, ta ? ka * lda + row : row * lda + ka) : 0.0f;
      Bs[ty][tx] =
          kb < K && col < N ? load_operand<kBf16>(B, tb ? col * ldb + kb : kb * ldb + col) : 0.0f;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kFb; ++k) acc = fmaf(As[ty][k], Bs[k][tx], acc);
      __syncthreads();
    }
    if (row < M && col < N) {
      float r = alpha * acc;
      if (beta != 0.0f) r += beta * C[row * ldc + col];
      if (bias) r += bias[col];
      C[row * ldc + col] = r;
    }
  }
}

}  // namespace

void to_bf16(uint16_t* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  to_bf16_kernel<<<grid_for(n), kThreads, 0, cur_stream()>>>(dst, src, n);
  LMF_CUDA(cudaGetLastError());
}

void from_bf16(float* dst, const uint16_t* src, int64_t n) {
  if (n <= 0) return;
  from_bf16_kernel<<<grid_for(n), kThreads, 0, cur_stream()>>>(dst, src, n);
  LMF_CUDA(cudaGetLastError());
}

void keep_master(float* master, const uint16_t* value, int64_t n) {
  if (n <= 0) return;
  keep_master_kernel<<<grid_for(n), kThreads, 0, cur_stream()>>>(master, value, n);
  LMF_CUDA(cudaGetLastError());
}

namespace detail {

void to_bf16_rows(uint16_t* dst, int64_t ld, const float* src, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  to_bf16_rows_kernel<<<grid_for(rows * cols), kThreads, 0, cur_stream()>>>(dst, ld, src, rows,
                                                                            cols);
  LMF_CUDA(cudaGetLastError());
}

void fill_rows(float* C, int64_t M, int64_t N, int64_t ldc, const float* bias) {
  if (M <= 0 || N <= 0) return;
  fill_rows_kernel<<<grid_for(M * N), kThreads, 0, cur_stream()>>>(C, M, N, ldc, bias);
  LMF_CUDA(cudaGetLastError());
}

void scale_rows(float* C, int64_t M, int64_t N, int64_t ldc, float beta) {
  if (M <= 0 || N <= 0) return;
  scale_rows_kernel<<<grid_for(M * N), kThreads, 0, cur_stream()>>>(C, M, N, ldc, beta);
  LMF_CUDA(cudaGetLastError());
}

void gemm_fallback(bool bf16, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                   const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
                   int64_t ldc, const float* bias) {
  if (M <= 0 || N <= 0 || K <= 0) raise("cuda::gemm_fallback: empty product");
  const int64_t col_tiles = (N + kFb - 1) / kFb, row_tiles = (M + kFb - 1) / kFb;
  if (col_tiles > 0x7fffffff) raise("cuda::gemm_fallback: N too large");
  const dim3 grid(static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(row_tiles < 65535 ? row_tiles : 65535));
  if (bf16)
    gemm_fallback_kernel<true><<<grid, dim3(kFb, kFb), 0, cur_stream()>>>(
        ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
  else
    gemm_fallback_kernel<false><<<grid, dim3(kFb, kFb), 0, cur_stream()>>>(
        ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
  LMF_CUDA(cudaGetLastError());
}

namespace {
template <typename D>
void bias_grad_impl(float* dbias, const D* dout, int64_t N, int64_t OC, int64_t ld, double* partial,
                    int64_t chunks) {
  if (OC <= 0) return;
  if (N <= 0) return;  // nothing to add
  if (chunks < 1 || chunks > 65535)
    raise("cuda::bias_grad: chunks " + std::to_string(chunks) + " outside [1, 65535]");
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>((OC + kBgCols - 1) / kBgCols),
                  static_cast<unsigned>(chunks));
  bias_grad_partial_kernel<D>
      <<<grid, dim3(kBgCols, kBgRows), 0, cur_stream()>>>(partial, dout, N, OC, ld, rows_per_chunk);
  LMF_CUDA(cudaGetLastError());
  bias_grad_finish_kernel<<<grid_for(OC), kThreads, 0, cur_stream()>>>(dbias, partial, OC, chunks);
  LMF_CUDA(cudaGetLastError());
}
}  // namespace

void bias_grad(float* dbias, const float* dout, int64_t N, int64_t OC, int64_t ld, double* partial,
               int64_t chunks) {
  bias_grad_impl(dbias, dout, N, OC, ld, partial, chunks);
}

void bias_grad(float* dbias, const uint16_t* dout, int64_t N, int64_t OC, int64_t ld,
               double* partial, int64_t chunks) {
  bias_grad_impl(dbias, dout, N, OC, ld, partial, chunks);
}

}  // namespace detail

}  // namespace lmforge::cuda
