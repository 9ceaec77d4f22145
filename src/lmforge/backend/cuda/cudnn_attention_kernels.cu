// The widening kernels around the cuDNN attention plans (cudnn_attention.cpp): bf16 -> fp32, and
// fp32 += bf16, on the grid-stride map (4 elements per unit when the pointers allow it). The
// narrowing direction is cuda::to_bf16 (matmul.h). A bf16 value widens exactly.
#include "lmforge/backend/cuda/cudnn_attention.h"
#include "lmforge/backend/cuda/device.cuh"

namespace lmforge::cuda::detail {

namespace {

// K consecutive bf16 values as floats; K == 4 is one 8-byte load (little-endian: the element at
// the lower address is the low half of each 32-bit word).
template <int K>
__device__ __forceinline__ Floats<K> load_bf16(const uint16_t* p) {
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

struct WidenOp {
  float* dst;
  const uint16_t* src;
  template <int K>
  __device__ void apply(int64_t i) const {
    store<K>(dst + i, load_bf16<K>(src + i));
  }
};

struct AccumulateOp {
  float* dst;
  const uint16_t* src;
  template <int K>
  __device__ void apply(int64_t i) const {
    const Floats<K> s = load_bf16<K>(src + i);
    Floats<K> d = load<K>(dst + i);
#pragma unroll
    for (int k = 0; k < K; ++k) d.v[k] = __fadd_rn(d.v[k], s.v[k]);
    store<K>(dst + i, d);
  }
};

}  // namespace

void bf16_to_fp32(float* dst, const uint16_t* src, int64_t n) {
  launch_map(WidenOp{dst, src}, n, aligned16(dst) && aligned8(src));
}

void accumulate_bf16(float* dst, const uint16_t* src, int64_t n) {
  launch_map(AccumulateOp{dst, src}, n, aligned16(dst) && aligned8(src));
}

}  // namespace lmforge::cuda::detail
