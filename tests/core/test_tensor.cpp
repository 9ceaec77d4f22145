#include <gtest/gtest.h>

#include "lmforge/core/arena.h"
#include "lmforge/core/tensor.h"

namespace lmforge {

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::empty({2, 3, 4}, DType::kF32);
  EXPECT_EQ(t.numel(), 24);
  Tensor v = t.view({6, -1});
  EXPECT_EQ(v.size(1), 4);
  v.data<float>()[5] = 7.0f;
  EXPECT_EQ(t.data<float>()[5], 7.0f);
  Tensor row = t[1];  // (3, 4), starts at element 12
  EXPECT_EQ(row.shape(), Shape({3, 4}));
  row.data<float>()[0] = 3.0f;
  EXPECT_EQ(t.data<float>()[12], 3.0f);
  Tensor s = t.view({24}).slice(20, 4);
  EXPECT_EQ(s.data<float>(), t.data<float>() + 20);
}

TEST(Tensor, ConvertsDtypes) {
  Tensor t = Tensor::empty({3}, DType::kF32);
  float vals[3] = {1.5f, -2.25f, 1e-3f};
  for (int i = 0; i < 3; ++i) t.data<float>()[i] = vals[i];
  Tensor d = t.to(DType::kF64);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(d.data<double>()[i], static_cast<double>(vals[i]));
  Tensor b = t.to(DType::kBF16).to(DType::kF32);
  EXPECT_EQ(b.data<float>()[0], 1.5f);  // exactly representable in bf16
  EXPECT_EQ(b.data<float>()[1], -2.25f);
  EXPECT_NEAR(b.data<float>()[2], 1e-3f, 1e-5f);
}

TEST(Arena, PlansOnceAndCarvesAlignedTensors) {
  Tensor a, b;
  Arena arena = Arena::planned([&](Arena& ar) {
    a = ar.alloc({3, 5});
    b = ar.alloc({7}, DType::kI32);
  });
  EXPECT_GE(arena.capacity(), (15 * 4 + 63) / 64 * 64 + 7 * 4);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.raw()) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.raw()) % 64, 0u);
  EXPECT_NE(a.raw(), b.raw());
  EXPECT_EQ(a.storage(), b.storage());  // one allocation
}

}  // namespace lmforge
