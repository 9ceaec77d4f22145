// Final-logit soft-capping (ops::softcap_forward / softcap_backward; Gemma 2) against the formula
// in double, at every ISA level (tanh512 where AVX-512 is present, std::tanh otherwise): y = cap
// tanh(x / cap), dx = dy (1 - (y / cap)^2); a bf16 dx is the fp32 one rounded once, rows ld apart
// with their padding untouched. (Attention's soft-capping is tested
// in test_flash_attention and test_ops_reference, a whole Gemma 2 against transformers in
// test_hf_reference.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "testing/compare.h"
#include "testing/random.h"

namespace lmforge {
namespace {

using testing::random_normal;

constexpr int64_t kN = 5, kV = 37;  // 37: two 16-lane blocks and a tail
constexpr double kCap = 1.5;

TEST(Softcap, LogitsAndGradientMatchDouble) {
  // Scale 3: most logits are bent by the cap, some saturate.
  const Tensor x = random_normal({kN, kV}, 3, 3.0), dy = random_normal({kN, kV}, 4, 1.0);
  Tensor y = x.clone();
  ops::softcap_forward(y, kCap);
  Tensor dx = Tensor::empty({kN, kV}, DType::kF32);
  ops::softcap_backward(dx, dy, y, kCap);
  Tensor want_y = Tensor::empty({kN, kV}, DType::kF32), want_dx = want_y.clone();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double t = std::tanh(static_cast<double>(x.data<float>()[i]) / kCap);
    want_y.data<float>()[i] = static_cast<float>(kCap * t);
    want_dx.data<float>()[i] = static_cast<float>(dy.data<float>()[i] * (1 - t * t));
  }
  EXPECT_TRUE(testing::tensors_close("softcap y", y, want_y, 1e-6));
  EXPECT_TRUE(testing::tensors_close("softcap dx", dx, want_dx, 1e-5));
  // In place on dy (the LM head's fp32 dlogits)
  Tensor g = dy.clone();
  ops::softcap_backward(g, g, y, kCap);
  EXPECT_EQ(std::memcmp(g.raw(), dx.raw(), dx.nbytes()), 0);
}

TEST(Softcap, Bf16GradientIsTheFp32OneRoundedOnce) {
  const Tensor x = random_normal({kN, kV}, 5, 3.0), dy = random_normal({kN, kV}, 6, 1.0);
  Tensor y = x.clone();
  ops::softcap_forward(y, kCap);
  Tensor dx = Tensor::empty({kN, kV}, DType::kF32);
  ops::softcap_backward(dx, dy, y, kCap);
  constexpr int64_t ld = 40;  // padded rows, as a GPU's bf16 dlogits
  Tensor d16 = Tensor::empty({kN, ld}, DType::kBF16);
  std::memset(d16.raw(), 0x7f, d16.nbytes());
  ops::softcap_backward(d16, dy, y, kCap);
  const uint16_t* h = d16.bf16_data();
  for (int64_t i = 0; i < kN; ++i)
    for (int64_t j = 0; j < ld; ++j) {
      const uint16_t want = j < kV ? fp32_to_bf16(dx.data<float>()[i * kV + j]) : 0x7f7f;
      ASSERT_EQ(h[i * ld + j], want) << "row " << i << " column " << j;
    }
}

}  // namespace
}  // namespace lmforge
