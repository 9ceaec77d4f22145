// Decoding's matrix-vector products (cpu/gemv.cpp): fp32 and bf16 weights, one to four rows of
// activations, against double sums of the same (bf16-rounded) operands; every remainder of K (16
// and 32 lanes) and of B's rows (blocks of four), row strides, bias and accumulation. Run under
// each LMFORGE_MAX_ISA (tests.cmake): AVX512-BF16's dot products, B widened in registers (AVX-512
// alone), and below AVX-512 the GEMMs they replace (gemv_takes false), through the same ops.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "testing/random.h"

namespace lmforge {
namespace {

using testing::randn;

std::vector<uint16_t> rounded(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  cpu::to_bf16(r.data(), v.data(), static_cast<int64_t>(v.size()));
  return r;
}

// C (M, N) [+]= A (M, K) B (N, K)^T [+ bias] with padded rows, by gemv / gemv_bf16, against
// double; C's padding is never written.
void check(bool bf16, int64_t M, int64_t N, int64_t K, bool bias, bool acc) {
  const int64_t lda = K + 3, ldb = K + 5, ldc = N + 2;
  std::vector<float> a = randn(M * lda, 2), b = randn(N * ldb, 3), c0 = randn(M * ldc, 4),
                     bv = randn(N, 5);
  const std::vector<uint16_t> a16 = rounded(a), b16 = rounded(b);
  std::vector<float> c = c0;
  if (bf16)
    cpu::gemv_bf16(M, N, K, a16.data(), lda, b16.data(), ldb, bias ? bv.data() : nullptr, acc,
                   c.data(), ldc);
  else
    cpu::gemv(M, N, K, a.data(), lda, b.data(), ldb, bias ? bv.data() : nullptr, acc, c.data(),
              ldc);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double ref = (acc ? c0[i * ldc + j] : 0.0) + (bias ? bv[j] : 0.0), mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double x = bf16 ? bf16_to_fp32(a16[i * lda + k]) : a[i * lda + k];
        const double y = bf16 ? bf16_to_fp32(b16[j * ldb + k]) : b[j * ldb + k];
        ref += x * y;
        mag += std::fabs(x * y);
      }
      ASSERT_NEAR(c[i * ldc + j], ref, 2e-6 * mag + 1e-6)
          << (bf16 ? "bf16" : "fp32") << " M=" << M << " N=" << N << " K=" << K << " at " << i
          << "," << j;
    }
    for (int64_t j = N; j < ldc; ++j) ASSERT_EQ(c[i * ldc + j], c0[i * ldc + j]);
  }
}

TEST(Gemv, MatchesDoubleForEveryRowCountAndRemainder) {
  if (!cpu::gemv_takes(1)) GTEST_SKIP() << "no AVX-512 (or capped): the GEMMs run instead";
  // bf16: the dot products (native, where AVX512-BF16 is present) and the widened kernel.
  for (auto mode : {cpu::Bf16Matmul::kNative, cpu::Bf16Matmul::kWidened}) {
    const cpu::Bf16MatmulScope scope(mode);
    for (bool bf16 : {false, true})
      for (int64_t M = 1; M <= cpu::kGemvMaxRows; ++M)
        for (int64_t N : {1, 3, 4, 9, 130})
          for (int64_t K : {1, 15, 16, 17, 31, 32, 33, 100, 771}) {
            check(bf16, M, N, K, /*bias=*/false, /*acc=*/false);
            check(bf16, M, N, K, /*bias=*/true, /*acc=*/false);
            check(bf16, M, N, K, /*bias=*/false, /*acc=*/true);
          }
  }
}

TEST(Gemv, TakesFewRowsWithAvx512Only) {
  EXPECT_EQ(cpu::gemv_takes(1), cpu::has_avx512());
  EXPECT_EQ(cpu::gemv_takes(cpu::kGemvMaxRows), cpu::has_avx512());
  EXPECT_FALSE(cpu::gemv_takes(cpu::kGemvMaxRows + 1));
  EXPECT_FALSE(cpu::gemv_takes(0));
}

// The layer as decoding calls it (ops::linear_forward, fp32 and bf16 weights, with a bias): the
// product of one row equals that row's product inside a many-row call (the GEMMs) to within
// their rounding, on every ISA.
TEST(Gemv, LinearOfOneRowMatchesTheSameRowOfAMatrixProduct) {
  const int64_t N = 40, C = 200, OC = 333;
  const Tensor inp = testing::random_normal({N, C}, 7), weight = testing::random_normal({OC, C}, 8),
               bias = testing::random_normal({OC}, 9);
  Tensor w16 = Tensor::empty({OC, C}, DType::kBF16);
  ops::to_bf16(w16, weight);
  for (const Tensor* wt : std::vector<const Tensor*>{&weight, &w16}) {
    Tensor all = Tensor::empty({N, OC}, DType::kF32);
    ops::linear_forward(all, inp, *wt, bias);
    for (int64_t rows = 1; rows <= cpu::kGemvMaxRows; ++rows) {
      Tensor some = Tensor::empty({rows, OC}, DType::kF32);
      ops::linear_forward(some, inp.slice(5, rows), *wt, bias);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t o = 0; o < OC; ++o)
          ASSERT_NEAR(some.data<float>()[i * OC + o], all.data<float>()[(5 + i) * OC + o], 2e-4)
              << (wt == &w16 ? "bf16" : "fp32") << " rows=" << rows << " at " << i << "," << o;
    }
  }
}

}  // namespace
}  // namespace lmforge
