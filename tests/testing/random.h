// Random test inputs as tensors (on the host): normal values from lmforge's own generator, so a
// seed gives the same tensor on every machine.
#pragma once

#include <cstdint>
#include <vector>

#include "lmforge/core/rng.h"
#include "lmforge/core/tensor.h"

namespace lmforge::testing {

// n fp32 values drawn from N(0, scale^2).
inline std::vector<float> randn(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng.normal() * scale);
  return v;
}

// fp32 values drawn from N(0, scale^2).
inline Tensor random_normal(Shape shape, uint64_t seed, double scale = 1.0) {
  Tensor t = Tensor::empty(shape, DType::kF32);
  Rng rng(seed);
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<float>()[i] = static_cast<float>(rng.normal() * scale);
  return t;
}

}  // namespace lmforge::testing
