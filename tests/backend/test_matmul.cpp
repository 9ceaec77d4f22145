// fp32 matmuls (cpu/matmul.cpp): oneDNN's sgemm in one panel of C per thread (op(B)'s columns, or
// op(A)'s rows when C is taller than wide), against the double reference gemm, in every
// transposition, with padded leading dimensions, alpha and beta, panels that split unevenly and
// C's padding never written; and the same call from inside a parallel region (one sgemm).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/rng.h"
#include "testing/random.h"

namespace lmforge {
namespace {

using testing::randn;

void check(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float beta, bool nested) {
  // Stored shapes: A (M, K) or (K, M), B (K, N) or (N, K); three spare columns in each.
  const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 3, ldc = N + 3;
  const std::vector<float> a = randn((ta ? K : M) * lda, 1), b = randn((tb ? N : K) * ldb, 2),
                           c0 = randn(M * ldc, 3);
  std::vector<float> c = c0;
  const float alpha = 0.75f;
  if (nested) {
#pragma omp parallel num_threads(2)
    {
#pragma omp single
      cpu::gemm<float>(ta, tb, M, N, K, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
    }
  } else {
    cpu::gemm<float>(ta, tb, M, N, K, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
  }
  const std::vector<double> ad(a.begin(), a.end()), bd(b.begin(), b.end());
  std::vector<double> ref(c0.begin(), c0.end()), mag(c0.size()), aa(ad.size()), ba(bd.size());
  cpu::gemm<double>(ta, tb, M, N, K, alpha, ad.data(), lda, bd.data(), ldb, beta, ref.data(), ldc);
  // The error's scale: the same sums of magnitudes.
  for (size_t i = 0; i < ad.size(); ++i) aa[i] = std::fabs(ad[i]);
  for (size_t i = 0; i < bd.size(); ++i) ba[i] = std::fabs(bd[i]);
  for (size_t i = 0; i < c0.size(); ++i) mag[i] = std::fabs(c0[i]);
  cpu::gemm<double>(ta, tb, M, N, K, alpha, aa.data(), lda, ba.data(), ldb, beta, mag.data(), ldc);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      if (j >= N) {
        ASSERT_EQ(c[i * ldc + j], c0[i * ldc + j]) << "padding written at " << i << "," << j;
        continue;
      }
      ASSERT_NEAR(c[i * ldc + j], ref[i * ldc + j], 1e-6 * mag[i * ldc + j] + 1e-7)
          << "ta=" << ta << " tb=" << tb << " M=" << M << " N=" << N << " K=" << K
          << " beta=" << beta << " nested=" << nested << " at " << i << "," << j;
    }
}

TEST(CpuGemm, Fp32PanelsMatchDoubleInEveryTransposition) {
  const int saved = omp_get_max_threads();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);  // panels even on a one-core machine
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{37, 301, 70},  // by columns
                               {301, 37, 70},                                       // by rows
                               {37, 513, 20},  // (513 / 2 is a multiple of 16: panels of
                               {513, 37, 20},  // 513 / 2 would miss the last column or row)
                               {200, 200, 1},
                               {70, 70, 33}})  // below the panel threshold at 3 threads
          for (float beta : {0.0f, 1.5f}) check(ta, tb, M, N, K, beta, false);
  }
  omp_set_num_threads(saved);
  check(false, true, 37, 301, 70, 1.5f, true);
  check(true, false, 301, 37, 70, 0.0f, true);
}

}  // namespace
}  // namespace lmforge
