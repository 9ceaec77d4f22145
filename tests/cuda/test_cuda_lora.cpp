// LoRA's ops on the GPU (nn/linear.h) against the same ops on the CPU, which test_lora checks
// against their definitions: copy_block (the block-diagonal expansion of a fused layer's B, in
// fp32 and bf16, and its gradient's diagonal blocks added back), and the dropout's mask and values
// (from fp32 and bf16 inputs, forward and backward, many blocks of threads). Bit-identical; every
// test skips without a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/backend/ops.h"
#include "testing/random.h"

namespace lmforge {
namespace {

constexpr Device kGpu = Device::kCUDA;

// A device result against the host's, byte for byte.
bool same(const Tensor& gpu_result, const Tensor& cpu_result) {
  const Tensor h = gpu_result.to(Device::kCPU);
  return h.nbytes() == cpu_result.nbytes() &&
         std::memcmp(h.raw(), cpu_result.raw(), h.nbytes()) == 0;
}

// Llama's qkv of three modules (widths 40, 8, 8), r = 3: B^T (r, 56) into its (3 r, 56)
// expansion, then a (3 r, 56) gradient's diagonal blocks written and then added into (r, 56).
TEST(CudaLora, CopyBlockMatchesTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t r = 3, OC = 56;
  const std::vector<int64_t> widths{40, 8, 8};
  for (DType dt : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor b = testing::random_normal({r, OC}, 1);
    if (dt == DType::kBF16) {
      Tensor b16 = Tensor::empty({r, OC}, DType::kBF16);
      ops::to_bf16(b16, b);
      b = b16;
    }
    const Tensor cpu_full = Tensor::zeros({3 * r, OC}, dt), gpu_b = b.to(kGpu);
    const Tensor gpu_full = cpu_full.to(kGpu);
    for (int64_t p = 0, col = 0; p < 3; col += widths[p++]) {
      ops::copy_block(cpu_full, p * r, col, b, 0, col, r, widths[p]);
      ops::copy_block(gpu_full, p * r, col, gpu_b, 0, col, r, widths[p]);
    }
    EXPECT_TRUE(same(gpu_full, cpu_full));
  }
  const Tensor dfull = testing::random_normal({3 * r, OC}, 2),
               grad = testing::random_normal({r, OC}, 3);
  const Tensor gpu_dfull = dfull.to(kGpu);
  for (bool add : {false, true}) {
    const Tensor cpu_grad = grad.clone(), gpu_grad = grad.to(kGpu);
    for (int64_t p = 0, col = 0; p < 3; col += widths[p++]) {
      ops::copy_block(cpu_grad, 0, col, dfull, p * r, col, r, widths[p], add);
      ops::copy_block(gpu_grad, 0, col, gpu_dfull, p * r, col, r, widths[p], add);
    }
    EXPECT_TRUE(same(gpu_grad, cpu_grad)) << (add ? "accumulated" : "written");
  }
}

TEST(CudaLora, DropoutMatchesTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  for (int64_t n : {int64_t{5}, int64_t{100003}, int64_t{(1 << 24) + 11}}) {
    SCOPED_TRACE(n);
    const double p = n == 5 ? 0.3 : 0.05;
    const Tensor x = testing::random_normal({n}, 4), g = testing::random_normal({n}, 5),
                 d0 = testing::random_normal({n}, 6);
    Tensor h = Tensor::empty({n}, DType::kBF16);
    ops::to_bf16(h, x);
    const Tensor o32 = Tensor::empty({n}, DType::kF32), o16 = Tensor::empty({n}, DType::kF32),
                 d = d0.clone();
    ops::dropout_forward(o32, x, p, 0x5eedu);
    ops::dropout_forward(o16, h, p, 0x5eedu);
    ops::dropout_backward(d, g, p, 0x5eedu);
    const Tensor go32 = o32.to(kGpu), go16 = o16.to(kGpu), gd = d0.to(kGpu);
    ops::dropout_forward(go32, x.to(kGpu), p, 0x5eedu);
    ops::dropout_forward(go16, h.to(kGpu), p, 0x5eedu);
    ops::dropout_backward(gd, g.to(kGpu), p, 0x5eedu);
    EXPECT_TRUE(same(go32, o32)) << "fp32 in";
    EXPECT_TRUE(same(go16, o16)) << "bf16 in";
    EXPECT_TRUE(same(gd, d)) << "backward";
  }
}

}  // namespace
}  // namespace lmforge
