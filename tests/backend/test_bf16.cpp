// bf16 mixed precision's kernels and the AVX-512 fp32 ones: the bf16 matmul against a plain
// double product of the same bf16-rounded operands, the conversion against the scalar
// round-to-nearest-even, AdamW's fused bf16 copy, and the vectorized exp against libm. The ops on
// bf16 activations: test_bf16_ops.cpp; models trained in bf16: test_bf16_training.cpp.
#include <gtest/gtest.h>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "testing/random.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once vecmath.h's kernels are inlined here (as in adamw.cpp): off for this
// file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lmforge {
namespace {

using testing::randn;

TEST(Bf16, ConversionIsRoundToNearestEvenWithDenormalsFlushed) {
  std::vector<float> v = randn(10007, 1, 100.0);
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            1.00390625f,  // exactly halfway between two bf16: stays (even)
                            1.01171875f,  // halfway, rounds up to even
                            3.0e38f,      // rounds to +inf
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min(),
                            -1e-40f,
                            std::numeric_limits<float>::min()};
  for (int i = 0; i < 11; ++i) v[i * 97] = specials[i];
  std::vector<uint16_t> out(v.size());
  cpu::to_bf16(out.data(), v.data(), static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i)
    ASSERT_EQ(out[i], fp32_to_bf16_ftz(v[i])) << "at " << i << " value " << v[i];
  EXPECT_EQ(fp32_to_bf16_ftz(1.00390625f), 0x3f80);
  EXPECT_EQ(fp32_to_bf16_ftz(1.01171875f), 0x3f82);
  EXPECT_EQ(fp32_to_bf16_ftz(-1e-40f), 0x8000);
  uint16_t nan16 = 0;
  float nan = std::numeric_limits<float>::quiet_NaN();
  cpu::to_bf16(&nan16, &nan, 1);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(nan16)));
}

// C = op(A) op(B) [+ bias | + C] on bf16 operands, checked against double sums of the same
// rounded values: only fp32 accumulation error remains.
void check_gemm(bool ta, bool tb, bool acc, bool bias, int64_t M = 37, int64_t N = 53,
                int64_t K = 71) {
  const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
  std::vector<float> a = randn((ta ? K : M) * lda, 2), b = randn((tb ? N : K) * ldb, 3),
                     c0 = randn(M * ldc, 4), bv = randn(N, 5);
  std::vector<uint16_t> a16(a.size()), b16(b.size());
  cpu::to_bf16(a16.data(), a.data(), static_cast<int64_t>(a.size()));
  cpu::to_bf16(b16.data(), b.data(), static_cast<int64_t>(b.size()));
  std::vector<float> c = c0;
  cpu::gemm_bf16(ta, tb, M, N, K, a16.data(), lda, b16.data(), ldb, bias ? bv.data() : nullptr, acc,
                 c.data(), ldc);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double ref = acc ? c0[i * ldc + j] : (bias ? bv[j] : 0.0), mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        double x = bf16_to_fp32(ta ? a16[k * lda + i] : a16[i * lda + k]);
        double y = bf16_to_fp32(tb ? b16[j * ldb + k] : b16[k * ldb + j]);
        ref += x * y;
        mag += std::fabs(x * y);
      }
      ASSERT_NEAR(c[i * ldc + j], ref, 1e-6 * mag + 1e-6)
          << "ta=" << ta << " tb=" << tb << " acc=" << acc << " bias=" << bias << " at " << i << ","
          << j;
    }
  // Padding columns of C are never written.
  for (int64_t i = 0; i < M; ++i) EXPECT_EQ(c[i * ldc + N], c0[i * ldc + N]);
}

// Native bf16 products (oneDNN's brgemm; widened anyway where oneDNN has none).
TEST(Bf16, GemmMatchesDoubleProductOfRoundedOperands) {
  const cpu::Bf16MatmulScope native(cpu::Bf16Matmul::kNative);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      check_gemm(ta, tb, false, false);
      check_gemm(ta, tb, true, false);
      check_gemm(ta, tb, false, true);
    }
}

// The weight-gradient product of our own (gemm_bf16's (trans_a, !trans_b) fp32 path): on AMX tiles,
// or with AVX512-BF16 dot products (without AMX, or under LMFORGE_MAX_ISA=avx512_bf16): shapes
// that pad every tile dimension, split columns among threads (few panels of rows) or not,
// unaligned rows (plain stores) and 64-byte aligned ones (streaming stores); against double sums
// of the rounded operands, and bit-identical whatever the thread count.
TEST(Bf16, WeightGradientKernelMatchesDoubleAndIsThreadCountInvariant) {
  const cpu::Bf16MatmulScope native(cpu::Bf16Matmul::kNative);
  const bool amx = cpu::amx_gemm_available();
  if (!amx && !cpu::has_avx512_bf16()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  struct Shape {
    int64_t M, N, K, ldc;
  };
  for (const Shape& s : {Shape{40, 300, 257, 301}, Shape{130, 64, 64, 64}, Shape{33, 17, 1, 17},
                         Shape{96, 48, cpu::kWeightGradMaxK, 48}, Shape{1000, 35, 31, 48}}) {
    const int64_t lda = s.M + 5, ldb = s.N + 3;
    std::vector<float> a = randn(s.K * lda, 21), b = randn(s.K * ldb, 22);
    std::vector<uint16_t> a16(a.size()), b16(b.size());
    cpu::to_bf16(a16.data(), a.data(), static_cast<int64_t>(a.size()));
    cpu::to_bf16(b16.data(), b.data(), static_cast<int64_t>(b.size()));
    EXPECT_EQ(cpu::weight_grad_gemm_takes(s.M, s.N, s.K), amx);  // dot products: LM heads only
    for (bool acc : {false, true}) {
      const std::vector<float> c0 = randn(s.M * s.ldc + 16, 23);
      std::vector<std::vector<float>> results;
      for (int threads : {1, 2, 3}) {
        std::vector<float> buf(s.M * s.ldc + 16);
        float* c = buf.data() + ((-reinterpret_cast<uintptr_t>(buf.data())) & 63) / 4;
        std::copy(c0.begin(), c0.begin() + s.M * s.ldc, c);
        const int before = omp_get_max_threads();
        omp_set_num_threads(threads);
        cpu::gemm_bf16_weight_grad(s.M, s.N, s.K, a16.data(), lda, b16.data(), ldb, acc, c, s.ldc);
        omp_set_num_threads(before);
        results.emplace_back(c, c + s.M * s.ldc);
      }
      for (int64_t i = 0; i < s.M; ++i) {
        for (int64_t j = 0; j < s.N; ++j) {
          double ref = acc ? c0[i * s.ldc + j] : 0.0, mag = std::fabs(ref);
          for (int64_t k = 0; k < s.K; ++k) {
            const double x = bf16_to_fp32(a16[k * lda + i]), y = bf16_to_fp32(b16[k * ldb + j]);
            ref += x * y;
            mag += std::fabs(x * y);
          }
          ASSERT_NEAR(results[0][i * s.ldc + j], ref, 1e-6 * mag + 1e-6)
              << "M=" << s.M << " N=" << s.N << " K=" << s.K << " acc=" << acc << " at " << i << ","
              << j;
        }
        for (int64_t j = s.N; j < s.ldc; ++j)  // padding columns never written
          ASSERT_EQ(results[0][i * s.ldc + j], c0[i * s.ldc + j]);
      }
      EXPECT_EQ(results[0], results[1]) << "M=" << s.M << " N=" << s.N << " K=" << s.K;
      EXPECT_EQ(results[0], results[2]) << "M=" << s.M << " N=" << s.N << " K=" << s.K;
    }
  }
  // An LM head's gradient takes the kernel either way; a layer's only on AMX; longer K never.
  EXPECT_TRUE(cpu::weight_grad_gemm_takes(50257, 768, 256));
  EXPECT_EQ(cpu::weight_grad_gemm_takes(768, 3072, 256), amx);
  EXPECT_FALSE(cpu::weight_grad_gemm_takes(50257, 768, cpu::kWeightGradMaxK + 1));
  // Widened bf16 products (a CPU that multiplies bf16 slower than fp32): never.
  cpu::set_bf16_matmul(cpu::Bf16Matmul::kWidened);
  EXPECT_FALSE(cpu::weight_grad_gemm_takes(50257, 768, 256));
}

// A CPU that reports AMX (and LMFORGE_MAX_ISA leaves it on) must run the AMX kernels: the OS
// granted the tile state. And an LM head's weight gradient (GPT-2's 50257 x 768 at K = 256, rows a
// page and more apart: the prefetching path) through the native kernel, AMX or dot products,
// against double sums of the rounded operands on sampled entries, rows at the panel edges too.
TEST(Bf16, NativeKernelsRunWhereTheCpuHasThemAndLmHeadGradientMatchesDouble) {
  const bool amx = cpu::amx_gemm_available();
  std::printf("bf16 products here: %s (CPU: %s)\n",
              amx                      ? "lmforge's AMX tiles"
              : cpu::has_avx512_bf16() ? "AVX512-BF16 dot products"
                                       : "none native (widened to fp32)",
              cpu_features().summary().c_str());
  EXPECT_EQ(amx, cpu_features().amx_bf16)
      << "the CPU reports AMX but the OS refused its tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
  const cpu::Bf16MatmulScope native(cpu::Bf16Matmul::kNative);
  if (!amx && !cpu::has_avx512_bf16()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  const int64_t M = 50257, N = 768, K = 256;
  ASSERT_TRUE(cpu::weight_grad_gemm_takes(M, N, K));
  std::vector<float> a = randn(K * M, 31), b = randn(K * N, 32);
  std::vector<uint16_t> a16(a.size()), b16(b.size());
  cpu::to_bf16(a16.data(), a.data(), static_cast<int64_t>(a.size()));
  cpu::to_bf16(b16.data(), b.data(), static_cast<int64_t>(b.size()));
  std::vector<float> c(M * N, std::numeric_limits<float>::quiet_NaN());
  cpu::gemm_bf16_weight_grad(M, N, K, a16.data(), M, b16.data(), N, false, c.data(), N);
  Rng rng(33);
  std::vector<int64_t> rows = {0, 31, 32, M - 18, M - 17, M - 1};
  for (int i = 0; i < 200; ++i) rows.push_back(static_cast<int64_t>(rng.next_u64() % M));
  for (int64_t i : rows)
    for (int64_t j : {int64_t{0}, int64_t{15}, int64_t{16}, int64_t{17}, N / 2, N - 1}) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double x = bf16_to_fp32(a16[k * M + i]), y = bf16_to_fp32(b16[k * N + j]);
        ref += x * y;
        mag += std::fabs(x * y);
      }
      ASSERT_NEAR(c[i * N + j], ref, 1e-6 * mag + 1e-6) << "at " << i << "," << j;
    }
  for (float x : c) ASSERT_FALSE(std::isnan(x)) << "an element of dW not written";
}

// gemm_bf16_tile's products (attention's tiles, one thread each) on AMX tiles, or AVX512-BF16 dot
// products without AMX (and under LMFORGE_MAX_ISA=avx512_bf16): every transpose, shapes that pad
// the tiles or fill them exactly (A read in place), an odd leading dimension, at the size limits,
// and a shape past them (oneDNN's), against double sums of the rounded operands.
TEST(Bf16, TileProductsMatchDoubleForEveryTranspose) {
  const cpu::Bf16MatmulScope native(cpu::Bf16Matmul::kNative);
  if (!cpu::gemm_bf16_tile_available()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  struct Shape {
    int64_t M, N, K;
  };
  for (const Shape& s : {Shape{64, 128, 64}, Shape{37, 45, 19}, Shape{128, 256, 256},
                         Shape{1, 1, 1}, Shape{33, 70, 130}, Shape{64, 64, 300}})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (int cases = 0; cases < 4; ++cases) {
          const bool acc = cases & 1;
          const int64_t pad = cases & 2 ? 8 : 7;  // even: whole tiles of A are read in place
          const int64_t lda = (ta ? s.M : s.K) + pad, ldb = (tb ? s.K : s.N) + 9, ldc = s.N + 3;
          std::vector<float> a = randn((ta ? s.K : s.M) * lda, 31),
                             b = randn((tb ? s.N : s.K) * ldb, 32), c0 = randn(s.M * ldc, 33);
          std::vector<uint16_t> a16(a.size()), b16(b.size());
          cpu::to_bf16(a16.data(), a.data(), static_cast<int64_t>(a.size()));
          cpu::to_bf16(b16.data(), b.data(), static_cast<int64_t>(b.size()));
          std::vector<float> c = c0;
          cpu::gemm_bf16_tile(ta, tb, s.M, s.N, s.K, a16.data(), lda, b16.data(), ldb, acc,
                              c.data(), ldc);
          for (int64_t i = 0; i < s.M; ++i) {
            for (int64_t j = 0; j < s.N; ++j) {
              double ref = acc ? c0[i * ldc + j] : 0.0, mag = std::fabs(ref);
              for (int64_t k = 0; k < s.K; ++k) {
                const double x = bf16_to_fp32(ta ? a16[k * lda + i] : a16[i * lda + k]);
                const double y = bf16_to_fp32(tb ? b16[j * ldb + k] : b16[k * ldb + j]);
                ref += x * y;
                mag += std::fabs(x * y);
              }
              ASSERT_NEAR(c[i * ldc + j], ref, 1e-6 * mag + 1e-6)
                  << "M=" << s.M << " N=" << s.N << " K=" << s.K << " ta=" << ta << " tb=" << tb
                  << " acc=" << acc << " at " << i << "," << j;
            }
            for (int64_t j = s.N; j < ldc; ++j) ASSERT_EQ(c[i * ldc + j], c0[i * ldc + j]);
          }
        }
}

// CPUs that multiply bf16 slower than fp32 (or, without AVX-512, not at all in Debian's oneDNN)
// widen the operands to fp32: the same sums, and a bf16 C is the fp32 result rounded once.
TEST(Bf16, WidenedFallbackMatchesDoubleProductOfRoundedOperands) {
  const cpu::Bf16MatmulScope widened(cpu::Bf16Matmul::kWidened);
  EXPECT_FALSE(cpu::gemm_bf16_tile_available());  // attention: its fp32 tiles
  EXPECT_FALSE(cpu::weight_grad_gemm_takes(50257, 768, 256));
  // Small; K long enough that op(B) goes in more panels of columns (N > M), or op(A) of rows
  // (M > N), than there are threads; K far the longest (in parts of K, one thread each, when C is
  // small; else in chunks of K that every thread multiplies).
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      check_gemm(ta, tb, false, false);
      check_gemm(ta, tb, true, false);
      check_gemm(ta, tb, false, true);
      check_gemm(ta, tb, true, false, 53, 37, 71);
      check_gemm(ta, tb, false, true, 53, 37, 71);
      check_gemm(ta, tb, true, false, 5, 3000, 2000);
      check_gemm(ta, tb, false, true, 5, 3000, 2000);
      check_gemm(ta, tb, true, false, 3000, 5, 2000);
      check_gemm(ta, tb, false, true, 3000, 5, 2000);
      check_gemm(ta, tb, true, false, 5, 300, 20000);
      check_gemm(ta, tb, false, true, 5, 300, 20000);
      check_gemm(ta, tb, true, false, 300, 5, 20000);
      check_gemm(ta, tb, false, true, 300, 5, 20000);
    }
  check_gemm(false, true, true, false, 513, 513, 4105);  // C too large for parts: chunks
  // The parts of K are set by K alone: the same sums whatever the thread count, for every
  // transpose, wide and tall C, with a bias, accumulating, and rounded to a bf16 C.
  for (const auto& [M, N] : {std::pair<int64_t, int64_t>{5, 300}, {300, 5}})
    for (int variant = 0; variant < 4; ++variant) {
      const bool ta = variant & 1, tb = variant & 2, bias = variant == 1, acc = variant == 2;
      const int64_t K = 20000;
      std::vector<float> a = randn(M * K, 14), b = randn(K * N, 15), bv = randn(N, 16),
                         c0 = randn(M * N, 17);
      std::vector<uint16_t> a16(a.size()), b16(b.size());
      cpu::to_bf16(a16.data(), a.data(), M * K);
      cpu::to_bf16(b16.data(), b.data(), K * N);
      std::vector<std::vector<float>> results;
      std::vector<std::vector<uint16_t>> results16;
      const int before = omp_get_max_threads();
      for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        std::vector<float> c = c0;
        std::vector<uint16_t> c16(M * N);
        cpu::gemm_bf16(ta, tb, M, N, K, a16.data(), ta ? M : K, b16.data(), tb ? K : N,
                       bias ? bv.data() : nullptr, acc, c.data(), N);
        cpu::gemm_bf16(ta, tb, M, N, K, a16.data(), ta ? M : K, b16.data(), tb ? K : N, bv.data(),
                       c16.data(), N);
        results.push_back(c);
        results16.push_back(c16);
      }
      omp_set_num_threads(before);
      for (int t : {1, 2}) {
        EXPECT_EQ(results[0], results[t]) << M << "x" << N << " variant " << variant;
        EXPECT_EQ(results16[0], results16[t]) << M << "x" << N << " variant " << variant;
      }
    }
  struct Shape {
    int64_t M, N, K;
  };
  for (const Shape& s :
       {Shape{9, 13, 21}, Shape{13, 9, 21}, Shape{5, 3000, 2000}, Shape{3000, 5, 2000},
        Shape{5, 300, 20000}, Shape{300, 5, 20000}, Shape{513, 513, 4105}}) {
    const int64_t M = s.M, N = s.N, K = s.K, ldc = N + 3;
    std::vector<float> a = randn(M * K, 11), b = randn(N * K, 12), bv = randn(N, 13);
    std::vector<uint16_t> a16(a.size()), b16(b.size()), c16(M * ldc, 0x7f7f);
    cpu::to_bf16(a16.data(), a.data(), M * K);
    cpu::to_bf16(b16.data(), b.data(), N * K);
    std::vector<float> c(M * N);
    cpu::gemm_bf16(false, true, M, N, K, a16.data(), K, b16.data(), K, bv.data(), false, c.data(),
                   N);
    cpu::gemm_bf16(false, true, M, N, K, a16.data(), K, b16.data(), K, bv.data(), c16.data(), ldc);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j)
        ASSERT_EQ(c16[i * ldc + j], fp32_to_bf16_ftz(c[i * N + j])) << i << "," << j;
      for (int64_t j = N; j < ldc; ++j) ASSERT_EQ(c16[i * ldc + j], 0x7f7f);  // padding untouched
    }
  }
}

TEST(Bf16, LinearWithBf16WeightRoundsInputsAndAccumulatesInFp32) {
  const int64_t N = 19, C = 24, OC = 40;
  std::vector<float> x = randn(N * C, 6), w = randn(OC * C, 7, 0.2), b = randn(OC, 8),
                     dy = randn(N * OC, 9);
  Tensor xt = Tensor::empty({N, C}, DType::kF32), w16 = Tensor::empty({OC, C}, DType::kBF16),
         bt = Tensor::empty({OC}, DType::kF32), y = Tensor::empty({N, OC}, DType::kF32),
         dyt = Tensor::empty({N, OC}, DType::kF32);
  std::memcpy(xt.data<float>(), x.data(), x.size() * 4);
  std::memcpy(bt.data<float>(), b.data(), b.size() * 4);
  std::memcpy(dyt.data<float>(), dy.data(), dy.size() * 4);
  cpu::to_bf16(w16.bf16_data(), w.data(), OC * C);
  ops::linear_forward(y, xt, w16, bt);
  Tensor dx = Tensor::zeros({N, C}, DType::kF32), dw = Tensor::zeros({OC, C}, DType::kF32),
         db = Tensor::zeros({OC}, DType::kF32);
  ops::linear_backward(dx, dw, db, dyt, xt, w16);
  auto r = [](float v) { return static_cast<double>(bf16_to_fp32(fp32_to_bf16_ftz(v))); };
  for (int64_t i = 0; i < N; ++i)
    for (int64_t o = 0; o < OC; ++o) {
      double ref = b[o];
      for (int64_t c = 0; c < C; ++c)
        ref += r(x[i * C + c]) * bf16_to_fp32(w16.bf16_data()[o * C + c]);
      EXPECT_NEAR(y.data<float>()[i * OC + o], ref, 1e-5 * (1 + std::fabs(ref)));
    }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) {
      double ref = 0;
      for (int64_t o = 0; o < OC; ++o)
        ref += r(dy[i * OC + o]) * bf16_to_fp32(w16.bf16_data()[o * C + c]);
      EXPECT_NEAR(dx.data<float>()[i * C + c], ref, 1e-5 * (1 + std::fabs(ref)));
    }
  for (int64_t o = 0; o < OC; ++o) {
    double rb = 0;
    for (int64_t i = 0; i < N; ++i) rb += dy[i * OC + o];  // bias gradient stays fp32
    EXPECT_NEAR(db.data<float>()[o], rb, 1e-5 * (1 + std::fabs(rb)));
    for (int64_t c = 0; c < C; ++c) {
      double ref = 0;
      for (int64_t i = 0; i < N; ++i) ref += r(dy[i * OC + o]) * r(x[i * C + c]);
      EXPECT_NEAR(dw.data<float>()[o * C + c], ref, 1e-5 * (1 + std::fabs(ref)));
    }
  }
}

TEST(Bf16, AdamWWritesTheBf16CopyWithoutChangingTheFp32Update) {
  const int64_t n = 100003;  // several chunks and a vector tail
  std::vector<float> p0 = randn(n, 10), g = randn(n, 11), m0 = randn(n, 12, 0.1), v0(n);
  for (int64_t i = 0; i < n; ++i) v0[i] = std::fabs(m0[i]);
  std::vector<float> p1 = p0, m1 = m0, v1 = v0, p2 = p0, m2 = m0, v2 = v0;
  std::vector<uint16_t> p16(n);
  cpu::adamw_update(p1.data(), g.data(), m1.data(), v1.data(), nullptr, n, 1e-3, 0.9, 0.95, 1e-8,
                    0.1, 7);
  cpu::adamw_update(p2.data(), g.data(), m2.data(), v2.data(), p16.data(), n, 1e-3, 0.9, 0.95, 1e-8,
                    0.1, 7);
  EXPECT_EQ(std::memcmp(p1.data(), p2.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(m1.data(), m2.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(v1.data(), v2.data(), n * 4), 0);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(p16[i], fp32_to_bf16_ftz(p2[i])) << i;
  // The vector body and the scalar tail apply the same formula: the update of element i does
  // not depend on where it falls (compare a shifted run).
  std::vector<float> ps(p0.begin() + 5, p0.end()), ms(m0.begin() + 5, m0.end()),
      vs(v0.begin() + 5, v0.end());
  cpu::adamw_update(ps.data(), g.data() + 5, ms.data(), vs.data(), nullptr, n - 5, 1e-3, 0.9, 0.95,
                    1e-8, 0.1, 7);
  EXPECT_EQ(std::memcmp(ps.data(), p1.data() + 5, (n - 5) * 4), 0);
}

// Clipping inside the update: grad_scale gives the bits of scaling the gradients in place first
// (what clip_grad_norm_ does before torch's step), in the vector body and the scalar tail.
TEST(Bf16, AdamWGradScaleIsScalingTheGradientsFirst) {
  const int64_t n = 100003;
  const double coef = 0.3711;
  std::vector<float> p1 = randn(n, 20), g = randn(n, 21), m1 = randn(n, 22, 0.1), v1(n);
  for (int64_t i = 0; i < n; ++i) v1[i] = std::fabs(m1[i]);
  std::vector<float> p2 = p1, m2 = m1, v2 = v1, scaled = g;
  for (float& x : scaled) x *= static_cast<float>(coef);
  std::vector<uint16_t> h1(n), h2(n);
  cpu::adamw_update(p1.data(), g.data(), m1.data(), v1.data(), h1.data(), n, 1e-3, 0.9, 0.95, 1e-8,
                    0.1, 3, coef);
  cpu::adamw_update(p2.data(), scaled.data(), m2.data(), v2.data(), h2.data(), n, 1e-3, 0.9, 0.95,
                    1e-8, 0.1, 3);
  EXPECT_EQ(std::memcmp(p1.data(), p2.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(m1.data(), m2.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(v1.data(), v2.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(h1.data(), h2.data(), n * 2), 0);
}

LMF_AVX512 void exp_lanes(const float* x, float* y) {
  _mm512_storeu_ps(y, cpu::exp512(_mm512_loadu_ps(x)));
}
LMF_AVX2 void exp_lanes_avx2(const float* x, float* y) {  // 16 lanes as two vectors of 8
  _mm256_storeu_ps(y, cpu::exp256(_mm256_loadu_ps(x)));
  _mm256_storeu_ps(y + 8, cpu::exp256(_mm256_loadu_ps(x + 8)));
}

void check_exp_lanes(void (*exp_lanes)(const float*, float*)) {
  std::vector<float> xs;
  for (float x = -87.0f; x < 88.5f; x += 0.0137f) xs.push_back(x);
  for (float x : {0.0f, -0.0f, 1e-8f, -1e-8f, 88.7f, -87.3f}) xs.push_back(x);
  while (xs.size() % 16) xs.push_back(0.5f);
  std::vector<float> ys(xs.size());
  for (size_t i = 0; i < xs.size(); i += 16) exp_lanes(xs.data() + i, ys.data() + i);
  for (size_t i = 0; i < xs.size(); ++i) {
    double ref = std::exp(static_cast<double>(xs[i]));
    double ulp = std::nextafter(static_cast<float>(ref), std::numeric_limits<float>::infinity()) -
                 static_cast<float>(ref);
    ASSERT_LE(std::fabs(ys[i] - ref), 2.0 * ulp) << "exp(" << xs[i] << ")";
  }
  float sp[16] = {-1000.0f, 1000.0f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  float out[16];
  exp_lanes(sp, out);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[2], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_TRUE(std::isnan(out[4]));
}

TEST(VecMath, ExpWithinTwoUlpOfLibm) {
  if (!cpu::has_avx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
  check_exp_lanes(exp_lanes);
}

// AVX2 has no scalef: 2^n in two factors, which must stay exact down to e^-87.3 and up to
// e^88.7 (n = -126 and 128).
TEST(VecMath, Avx2ExpWithinTwoUlpOfLibm) {
  if (!cpu::has_avx2()) GTEST_SKIP() << "no AVX2 on this CPU (or LMFORGE_MAX_ISA=baseline)";
  check_exp_lanes(exp_lanes_avx2);
}

}  // namespace
}  // namespace lmforge

#pragma GCC diagnostic pop
