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

// Logits x of scale 3 (most of them bent by the cap, some saturated), their capped values y, a
// gradient dy and the fp32 dx the ops give from them.
struct Capped {
  Tensor x, dy, y, dx;
  explicit Capped(uint64_t seed)
      : x(random_normal({kN, kV}, seed, 3.0)),
        dy(random_normal({kN, kV}, seed + 1, 1.0)),
        y(x.clone()),
        dx(Tensor::empty({kN, kV}, DType::kF32)) {
    ops::softcap_forward(y, kCap);
    ops::softcap_backward(dx, dy, y, kCap);
  }
};

TEST(Softcap, LogitsAndGradientMatchDouble) {
  const Capped c(3);
  Tensor want_y = Tensor::empty({kN, kV}, DType::kF32), want_dx = want_y.clone();
  for (int64_t i = 0; i < c.x.numel(); ++i) {
    const double t = std::tanh(static_cast<double>(c.x.data<float>()[i]) / kCap);
    want_y.data<float>()[i] = static_cast<float>(kCap * t);
    want_dx.data<float>()[i] = static_cast<float>(c.dy.data<float>()[i] * (1 - t * t));
  }
  EXPECT_TRUE(testing::tensors_close("softcap y", c.y, want_y, 1e-6));
  EXPECT_TRUE(testing::tensors_close("softcap dx", c.dx, want_dx, 1e-5));
  // In place on dy (the LM head's fp32 dlogits)
  Tensor g = c.dy.clone();
  ops::softcap_backward(g, g, c.y, kCap);
  EXPECT_EQ(std::memcmp(g.raw(), c.dx.raw(), c.dx.nbytes()), 0);
}

TEST(Softcap, Bf16GradientIsTheFp32OneRoundedOnce) {
  const Capped c(5);
  constexpr int64_t ld = 40;  // padded rows, as a GPU's bf16 dlogits
  Tensor d16 = Tensor::empty({kN, ld}, DType::kBF16);
  std::memset(d16.raw(), 0x7f, d16.nbytes());
  ops::softcap_backward(d16, c.dy, c.y, kCap);
  const uint16_t* h = d16.bf16_data();
  for (int64_t i = 0; i < kN; ++i)
    for (int64_t j = 0; j < ld; ++j) {
      const uint16_t want = j < kV ? fp32_to_bf16(c.dx.data<float>()[i * kV + j]) : 0x7f7f;
      ASSERT_EQ(h[i * ld + j], want) << "row " << i << " column " << j;
    }
}

}  // namespace
}  // namespace lmforge
