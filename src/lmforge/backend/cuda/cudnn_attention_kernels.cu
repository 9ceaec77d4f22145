// The widening kernels around the cuDNN attention plans (cudnn_attention.cpp): bf16 -> fp32, and
// fp32 += bf16, on the grid-stride map (4 elements per unit when the pointers allow it). The
// narrowing direction is cuda::to_bf16 (matmul.h). A bf16 value widens exactly.
#include "lmforge/backend/cuda/cudnn_attention.h"
#include "lmforge/backend/cuda/device.cuh"

namespace lmforge::cuda::detail {

namespace {

struct WidenOp {
  float* dst;
  const uint16_t* src;
  template <int K>
  __device__ void apply(int64_t i) const {
    store<K>(dst + i, load<K>(src + i));
  }
};

struct AccumulateOp {
  float* dst;
  const uint16_t* src;
  template <int K>
  __device__ void apply(int64_t i) const {
    const Floats<K> s = load<K>(src + i);
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
