// Final-logit soft-capping's CUDA kernels (cuda::softcap_rows, softcap_grad_rows; Gemma 2) against
// the CPU's: y = cap tanh(x / cap) (CUDA tanhf against the CPU's exp-based tanh: kElementwise),
// dx = dy (1 - (y / cap)^2) in fp32 (in place too) and into bf16 rows padded past V (each within
// a bf16 ulp of the CPU's, the padding untouched). Label cuda: skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/kernel_checks.h"
#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "testing/cuda.h"

namespace lmforge {
namespace {

using namespace testing;

TEST(CudaSoftcap, LogitsAndGradientsMatchCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  for (const auto& [N, V] : {std::pair<int64_t, int64_t>{7, 50257}, {3, 37}, {5, 1}}) {
    Rng rng(11 + V);
    const float cap = 1.5f;
    const std::vector<float> x = randn(rng, N * V, 3.0), dy = randn(rng, N * V, 1.0);
    std::vector<float> y = x, dx(N * V);
    cpu::softcap_rows<float>(y.data(), N, V, cap);
    cpu::softcap_grad_rows<float, float>(dx.data(), V, dy.data(), y.data(), N, V, cap);

    DeviceArray<float> d_y(x), d_dy(dy), d_dx(zeros(N * V));
    cuda::softcap_rows(d_y.get(), N, V, cap);
    EXPECT_TRUE(close("softcap y", d_y.host(), y, kElementwise)) << N << "x" << V;
    // The gradient from the CPU's capped values, so only the backward kernel is compared.
    DeviceArray<float> d_ycpu(y);
    cuda::softcap_grad_rows(d_dx.get(), V, d_dy.get(), d_ycpu.get(), N, V, cap);
    EXPECT_TRUE(close("softcap dx", d_dx.host(), dx, kElementwise)) << N << "x" << V;
    cuda::softcap_grad_rows(d_dy.get(), V, d_dy.get(), d_ycpu.get(), N, V, cap);  // in place
    EXPECT_EQ(d_dy.host(), d_dx.host());

    const int64_t ld = (V + 7) / 8 * 8;
    DeviceArray<uint16_t> d16(std::vector<uint16_t>(N * ld, 0xabab));
    DeviceArray<float> d_dy2(dy);
    cuda::softcap_grad_rows(d16.get(), ld, d_dy2.get(), d_ycpu.get(), N, V, cap);
    const std::vector<uint16_t> got = d16.host();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < ld; ++j) {
        const uint16_t h = got[i * ld + j];
        if (j >= V) {
          ASSERT_EQ(h, 0xabab) << "padding written at row " << i << " column " << j;
          continue;
        }
        const float want = dx[i * V + j], g = bf16_to_fp32(h);
        ASSERT_LE(std::fabs(g - want), std::fabs(want) / 128 + 1e-30f)
            << "row " << i << " column " << j;
      }
  }
}

}  // namespace
}  // namespace lmforge
