// What the CUDA kernels of kernels.h share (included by their .cu files only). The kernels are fp32
// (see kernels.h for the contract). The maths and its rounding points follow
// the CPU reference kernels (backend/cpu/*.cpp) line by line; where the CPU does a plain fp32
// multiply-then-add, the kernels use __fmul_rn / __fadd_rn so nvcc cannot contract it into an
// FMA, making embedding, rope and AdamW bit-identical to the CPU.
//
// Decompositions:
//   elementwise   one grid-stride map (map_kernel), float4 when every pointer is 16-byte aligned
//   row kernels   norms: one warp per row; softmax_xent: one block per row (online max / sum)
//   column sums   norm weight gradients: (column tile, row chunk) blocks write double partials,
//                 a second kernel adds them per column in chunk order
//   sums          sum_squares / lse^2: fixed blocks write partials, one block adds them in order
//
// Files: arith.cu (add, scale, fill, sum_squares, the shared scratch), embedding.cu, norm.cu,
// pointwise.cu (RoPE, GELU, SwiGLU, AdamW), xent.cu (softmax cross-entropy).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/cuda/runtime.h"

namespace lmforge::cuda::detail {

constexpr int kThreads = 256;                 // elementwise and row kernels: threads per block
constexpr int kRowsPerBlock = kThreads / 32;  // norms: one warp per row
constexpr unsigned kFullMask = 0xffffffffu;

inline cudaStream_t cur_stream() { return static_cast<cudaStream_t>(stream()); }

// The number of multiprocessors of the current device (cached).
int sm_count();

// The partial sums of the reductions: one device buffer of at least `count` doubles, allocated
// on first use and regrown when a call needs more (after synchronizing: kernels queued earlier
// may still read the old one). Every use is stream-ordered, so calls share it. Kept until exit.
double* scratch(int64_t count);

// *out (+)= the sum of partial[0, n) in a fixed order (one block): the last step of every
// deterministic reduction here.
void sum_partials(double* out, const double* partial, int64_t n, bool accumulate);

template <typename... P>
bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}
inline bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

// ---------------------------------------------------------------------------------------------
// Device helpers

// K consecutive floats, loaded as one float4 when K == 4 (the address is then 16-byte aligned).
template <int K>
struct Floats {
  float v[K];
};

template <int K>
__device__ __forceinline__ Floats<K> load(const float* p) {
  Floats<K> r;
  if constexpr (K == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    r.v[0] = q.x;
    r.v[1] = q.y;
    r.v[2] = q.z;
    r.v[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = p[k];
  }
  return r;
}

// K consecutive bf16 values widened (exactly) to floats; K == 4 is one 8-byte load (the pointer
// is then 8-byte aligned; little-endian: the element at the lower address is the low half of
// each 32-bit word). With the fp32 load above, kernels templated on their input type read either.
template <int K>
__device__ __forceinline__ Floats<K> load(const uint16_t* p) {
  Floats<K> r;
  if constexpr (K == 4) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    r.v[0] = __uint_as_float(q.x << 16);
    r.v[1] = __uint_as_float(q.x & 0xffff0000u);
    r.v[2] = __uint_as_float(q.y << 16);
    r.v[3] = __uint_as_float(q.y & 0xffff0000u);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = __uint_as_float(static_cast<uint32_t>(p[k]) << 16);
  }
  return r;
}

// Alignment for the vectorized (K == 4) path of a pointer of either element type: 16 bytes for
// fp32, 8 for bf16.
inline bool aligned4(const float* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool aligned4(const uint16_t* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

template <int K>
__device__ __forceinline__ void store(float* p, const Floats<K>& r) {
  if constexpr (K == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = r.v[k];
  }
}

// K bf16 values; K == 4 is one 8-byte store.
template <int K>
__device__ __forceinline__ void store_bf16(uint16_t* p, const uint16_t (&h)[K]) {
  if constexpr (K == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(h[0] | (static_cast<uint32_t>(h[1]) << 16),
                                              h[2] | (static_cast<uint32_t>(h[3]) << 16));
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = h[k];
  }
}

// fp32 -> bf16, round to nearest even, denormals to zero: core/dtype.h fp32_to_bf16_ftz.
__device__ __forceinline__ uint16_t bf16_ftz(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// K values into a bf16 buffer, rounded as bf16_ftz (bf16 activations); K == 4 needs 8-byte
// alignment. With the fp32 store above, kernels templated on their output type write either.
template <int K>
__device__ __forceinline__ void store(uint16_t* p, const Floats<K>& r) {
  uint16_t h[K];
#pragma unroll
  for (int k = 0; k < K; ++k) h[k] = bf16_ftz(r.v[k]);
  store_bf16<K>(p, h);
}

// Butterfly sum: every lane ends with the same value (addition is commutative).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block, in a fixed tree; the result is valid in thread 0.
__device__ inline double block_sum(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  double t = 0;
  if (warp == 0) t = warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? part[lane] : 0.0);
  __syncthreads();  // part is reused by a second call in the same kernel
  return t;
}

// Row i of a norm: cpu::row_offset.
__device__ __forceinline__ int64_t row_offset(int64_t i, int64_t C, int64_t group, int64_t stride) {
  return group == 1 ? i * stride : (i / group) * stride + (i % group) * C;
}

// ---------------------------------------------------------------------------------------------
// Elementwise: op.apply<K>(i) handles elements [i, i + K). The vectorized body covers the
// multiple-of-4 prefix, the scalar loop the rest.

template <int K, typename Op>
__global__ void __launch_bounds__(kThreads) map_kernel(Op op, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nk = n / K * K;
  for (int64_t i = tid * K; i < nk; i += step * K) op.template apply<K>(i);
  for (int64_t i = nk + tid; i < n; i += step) op.template apply<1>(i);
}

// vec: every pointer the op touches is 16-byte aligned (8 for bf16) and a group of 4 elements
// never straddles a row of the op.
template <typename Op>
void launch_map(const Op& op, int64_t n, bool vec) {
  if (n <= 0) return;
  const int k = vec ? 4 : 1;
  const int64_t units = (n + k - 1) / k;
  const int64_t blocks =
      std::min<int64_t>((units + kThreads - 1) / kThreads, static_cast<int64_t>(sm_count()) * 16);
  if (vec)
    map_kernel<4><<<static_cast<unsigned>(blocks), kThreads, 0, cur_stream()>>>(op, n);
  else
    map_kernel<1><<<static_cast<unsigned>(blocks), kThreads, 0, cur_stream()>>>(op, n);
  LMF_CUDA_LAUNCHED();
}

}  // namespace lmforge::cuda::detail
