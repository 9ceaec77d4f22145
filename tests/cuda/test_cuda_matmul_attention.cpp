// The CUDA matmuls (backend/cuda/matmul.h) and flash attention (backend/cuda/attention.h) against
// their CPU twins (backend/cpu/kernels.h) on random inputs: gemm in all four transposes with
// alpha/beta and padded leading dimensions (one operand deliberately misaligned), gemm_bf16 with
// bias and accumulate, the bf16 conversion bit for bit, linear forward/backward in fp32 and bf16
// (backward adding into non-zero gradients), and attention forward/backward with T not a
// multiple of the 64-row tile, GQA (NH = 4 over NKV = 2, and MQA), windows 0 / 37 / 5 and head
// sizes 32, 64 and 80 (padded to 128). Backward must also be deterministic: a second call adds
// exactly the same gradient again.
//
// The measure is testing/compare.h's normalised error max|gpu - cpu| / max|cpu| per tensor; a
// failure prints it with the max abs error, the max relative error and where. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/attention.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "testing/compare.h"
#include "testing/cuda.h"

namespace lmforge {
namespace {

// Tolerances (normalised error), one per comparison.
struct Tolerances {
  double gemm = 1e-5;            // cuBLASLt fp32 (no TF32) vs oneDNN sgemm: summation order only
  double gemm_bf16 = 1e-5;       // identical bf16 operands, fp32 accumulation on both sides
  double linear = 1e-5;          // fp32; dbias summed in double on both sides
  double linear_bf16 = 1e-5;     // bf16 conversion is bit-identical, then as gemm_bf16
  double attention = 1e-5;       // out and lse: fp32 online softmax, different tile order
  double attention_grad = 5e-5;  // dqkv: fp32, dS = P (dP - D) loses a few bits to cancellation
};
constexpr Tolerances kTol;

std::vector<float> randn(size_t n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng.normal() * scale);
  return v;
}

using testing::DeviceArray;

using testing::parity;

std::vector<uint16_t> bf16_of(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  cpu::to_bf16(r.data(), v.data(), static_cast<int64_t>(v.size()));
  return r;
}

TEST(CudaMatmul, GemmAllTransposesAlphaBeta) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  struct Case {
    int64_t M, N, K;
    float alpha, beta;
    int64_t offset_a;  // elements: 1 leaves A 4-byte aligned only
  };
  const Case cases[] = {{37, 53, 71, 1.0f, 0.0f, 0},
                        {37, 53, 71, 0.5f, 1.5f, 0},
                        {37, 53, 71, -1.25f, 1.0f, 1},
                        {256, 192, 320, 1.0f, 1.0f, 0},
                        {1, 7, 300, 2.0f, 0.0f, 0}};
  uint64_t seed = 10;
  for (const Case& c : cases)
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t lda = (ta ? c.M : c.K) + 3, ldb = (tb ? c.K : c.N) + 5, ldc = c.N + 2;
      const std::vector<float> a = randn((ta ? c.K : c.M) * lda + c.offset_a, ++seed),
                               b = randn((tb ? c.N : c.K) * ldb, ++seed),
                               c0 = randn(c.M * ldc, ++seed);
      std::vector<float> want = c0;
      cpu::gemm<float>(ta, tb, c.M, c.N, c.K, c.alpha, a.data() + c.offset_a, lda, b.data(), ldb,
                       c.beta, want.data(), ldc);
      DeviceArray<float> da(a), db(b), dc(c0);
      cuda::gemm(ta, tb, c.M, c.N, c.K, c.alpha, da.get() + c.offset_a, lda, db.get(), ldb, c.beta,
                 dc.get(), ldc);
      EXPECT_TRUE(parity(fmt::format("gemm ta={} tb={} M={} N={} K={} alpha={} beta={} offset={}",
                                     ta, tb, c.M, c.N, c.K, c.alpha, c.beta, c.offset_a),
                         dc.host(), want, kTol.gemm));
    }
}

TEST(CudaMatmul, ToBf16IsBitIdenticalToTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  std::vector<float> v = randn(10007, 1, 100.0);
  const float specials[] = {0.0f,
                            -0.0f,
                            1.00390625f,  // halfway: stays (even)
                            1.01171875f,  // halfway: rounds up to even
                            3.0e38f,      // rounds to +inf
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min(),
                            -1e-40f,
                            std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::quiet_NaN()};
  for (size_t i = 0; i < std::size(specials); ++i) v[i * 97] = specials[i];
  const std::vector<uint16_t> want = bf16_of(v);
  DeviceArray<float> dv(v);
  DeviceArray<uint16_t> dout(v.size());
  cuda::to_bf16(dout.get(), dv.get(), static_cast<int64_t>(v.size()));
  const std::vector<uint16_t> got = dout.host();
  for (size_t i = 0; i < v.size(); ++i) {
    if (std::isnan(v[i])) {
      EXPECT_TRUE(std::isnan(bf16_to_fp32(got[i]))) << "at " << i;
      continue;
    }
    ASSERT_EQ(got[i], want[i]) << "at " << i << " value " << v[i];
  }
}

TEST(CudaMatmul, GemmBf16BiasAndAccumulate) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t M = 37, N = 53, K = 71;
  uint64_t seed = 100;
  for (int t = 0; t < 4; ++t)
    for (int mode = 0; mode < 4; ++mode) {  // plain, bias, accumulate, plain with A misaligned
      const bool ta = t & 1, tb = t & 2, bias = mode == 1, acc = mode == 2;
      const int64_t off = mode == 3 ? 1 : 0;  // one bf16: A only 2-byte aligned
      const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
      const std::vector<uint16_t> a = bf16_of(randn((ta ? K : M) * lda + off, ++seed)),
                                  b = bf16_of(randn((tb ? N : K) * ldb, ++seed));
      const std::vector<float> c0 = randn(M * ldc, ++seed), bv = randn(N, ++seed);
      std::vector<float> want = c0;
      cpu::gemm_bf16(ta, tb, M, N, K, a.data() + off, lda, b.data(), ldb,
                     bias ? bv.data() : nullptr, acc, want.data(), ldc);
      DeviceArray<uint16_t> da(a), db(b);
      DeviceArray<float> dc(c0), dbias(bv);
      cuda::gemm_bf16(ta, tb, M, N, K, da.get() + off, lda, db.get(), ldb,
                      bias ? dbias.get() : nullptr, acc, dc.get(), ldc);
      EXPECT_TRUE(parity(fmt::format("gemm_bf16 ta={} tb={} bias={} accumulate={} offset={}", ta,
                                     tb, bias, acc, off),
                         dc.host(), want, kTol.gemm_bf16));
    }
}

// Forward into out; backward adds into non-zero dinp, dweight, dbias (and with null pointers for
// the gradients not wanted), fp32 or bf16 weights.
void check_linear(bool bf16, bool with_bias, int64_t N, int64_t C, int64_t OC, uint64_t seed) {
  const std::vector<float> inp = randn(N * C, seed), w = randn(OC * C, seed + 1, 0.1),
                           b = randn(OC, seed + 2), dout = randn(N * OC, seed + 3),
                           dinp0 = randn(N * C, seed + 4), dw0 = randn(OC * C, seed + 5),
                           db0 = randn(OC, seed + 6);
  const std::vector<uint16_t> w16 = bf16_of(w);
  std::vector<float> out(N * OC), dinp = dinp0, dw = dw0, db = db0;
  const float* bias = with_bias ? b.data() : nullptr;
  float* dbias = with_bias ? db.data() : nullptr;
  if (bf16) {
    cpu::linear_forward_bf16(out.data(), inp.data(), w16.data(), bias, N, C, OC);
    cpu::linear_backward_bf16(dinp.data(), dw.data(), dbias, dout.data(), inp.data(), w16.data(), N,
                              C, OC);
  } else {
    cpu::linear_forward<float>(out.data(), inp.data(), w.data(), bias, N, C, OC);
    cpu::linear_backward<float>(dinp.data(), dw.data(), dbias, dout.data(), inp.data(), w.data(), N,
                                C, OC);
  }

  DeviceArray<float> d_inp(inp), d_w(w), d_b(b), d_dout(dout), d_out(N * OC), d_dinp(dinp0),
      d_dw(dw0), d_db(db0);
  DeviceArray<uint16_t> d_w16(w16);
  const float* gbias = with_bias ? d_b.get() : nullptr;
  float* gdbias = with_bias ? d_db.get() : nullptr;
  if (bf16) {
    cuda::linear_forward_bf16(d_out.get(), d_inp.get(), d_w16.get(), gbias, N, C, OC);
    cuda::linear_backward_bf16(d_dinp.get(), d_dw.get(), gdbias, d_dout.get(), d_inp.get(),
                               d_w16.get(), N, C, OC);
  } else {
    cuda::linear_forward(d_out.get(), d_inp.get(), d_w.get(), gbias, N, C, OC);
    cuda::linear_backward(d_dinp.get(), d_dw.get(), gdbias, d_dout.get(), d_inp.get(), d_w.get(), N,
                          C, OC);
  }
  const double tol = bf16 ? kTol.linear_bf16 : kTol.linear;
  const std::string tag =
      fmt::format("{} N={} C={} OC={} bias={}", bf16 ? "bf16" : "fp32", N, C, OC, with_bias);
  EXPECT_TRUE(parity("linear out " + tag, d_out.host(), out, tol));
  EXPECT_TRUE(parity("linear dinp " + tag, d_dinp.host(), dinp, tol));
  EXPECT_TRUE(parity("linear dweight " + tag, d_dw.host(), dw, tol));
  if (with_bias) {
    EXPECT_TRUE(parity("linear dbias " + tag, d_db.host(), db, tol));
  }

  // Only dweight wanted: dinp and dbias stay untouched.
  DeviceArray<float> e_dinp(dinp0), e_dw(dw0), e_db(db0);
  if (bf16)
    cuda::linear_backward_bf16(nullptr, e_dw.get(), nullptr, d_dout.get(), d_inp.get(), d_w16.get(),
                               N, C, OC);
  else
    cuda::linear_backward(nullptr, e_dw.get(), nullptr, d_dout.get(), d_inp.get(), d_w.get(), N, C,
                          OC);
  EXPECT_TRUE(parity("linear dweight alone " + tag, e_dw.host(), dw, tol));
  EXPECT_EQ(e_dinp.host(), dinp0);
  EXPECT_EQ(e_db.host(), db0);
}

TEST(CudaMatmul, LinearFp32) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  check_linear(false, true, 300, 96, 80, 1000);  // N = 300: three bias-gradient chunks
  check_linear(false, false, 67, 33, 51, 2000);
}

TEST(CudaMatmul, LinearBf16) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  check_linear(true, true, 300, 96, 80, 3000);
  check_linear(true, false, 67, 40, 56, 4000);
  // OC not a multiple of 8 (GPT-2's vocabulary is 50257): the backward's bf16(dout) rows are
  // padded to 16 bytes (matmul.cpp).
  check_linear(true, false, 130, 64, 1001, 5000);
}

// The parity tests pass just as well on the slow paths (the plain fallback kernel, a bias added
// outside the epilogue), so they cannot tell a descriptor mistake from a working cuBLASLt: GPT-2's
// shapes (aligned activations, the LM head's 50257 columns in padded rows) must get cuBLASLt plans,
// and with an fp32 output the bias must go through the epilogue.
TEST(CudaMatmul, ModelShapesStayOnCublasLt) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t N = 128, C = 768;
  const cuda::MatmulPlanCounts before = cuda::matmul_plan_counts();
  DeviceArray<float> x(randn(N * C, 1)), out32(N * 50260), dout(randn(N * 50257, 2, 0.01)),
      dx(N * 4 * C), dw(50257 * C), b(randn(4 * C, 3));
  DeviceArray<uint16_t> x16(bf16_of(randn(N * C, 4))), w16(bf16_of(randn(50257 * C, 5, 0.02))),
      out16(N * 4 * C);
  for (int64_t oc : {3 * C, 4 * C, C}) {  // qkv, fc, proj (all with a bias in GPT-2)
    cuda::linear_forward_bf16(out32.get(), x16.get(), w16.get(), b.get(), N, C, oc);
    cuda::linear_forward(out32.get(), x.get(), dw.get(), b.get(), N, C, oc);  // fp32 mode
  }
  // The LM head as the model runs it on a GPU: logits rows padded to 50260 (16 bytes).
  cuda::linear_forward_bf16(out32.get(), x16.get(), w16.get(), nullptr, N, C, 50257, 50260);
  cuda::linear_backward_bf16(dx.get(), dw.get(), nullptr, dout.get(), x16.get(), w16.get(), N, C,
                             50257);
  const cuda::MatmulPlanCounts fp32_out = cuda::matmul_plan_counts();
  EXPECT_GE(fp32_out.plans - before.plans, 9);
  EXPECT_EQ(fp32_out.fallback - before.fallback, 0) << "see the cuBLASLt warnings on stderr";
  EXPECT_EQ(fp32_out.unfused_bias - before.unfused_bias, 0) << "fp32 bias with an fp32 output";
  // bf16 outputs: their epilogue adds a bf16 copy of the bias (cuBLASLt takes no fp32 bias with a
  // bf16 D); the other path, an fp32 gemm and a rounding pass, is twice the output traffic.
  for (int64_t oc : {3 * C, 4 * C})
    cuda::linear_forward_bf16(out16.get(), x16.get(), w16.get(), b.get(), N, C, oc);
  const cuda::MatmulPlanCounts bf16_out = cuda::matmul_plan_counts();
  EXPECT_EQ(bf16_out.fallback - fp32_out.fallback, 0) << "see the cuBLASLt warnings on stderr";
  EXPECT_EQ(bf16_out.unfused_bias - fp32_out.unfused_bias, 0) << "bf16 bias with a bf16 output";
  cuda::synchronize();
}

TEST(CudaMatmul, BiasGradIsDeterministic) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t N = 5000, OC = 77;
  DeviceArray<float> dout(randn(N * OC, 7)), db1(std::vector<float>(OC, 0.0f)),
      db2(std::vector<float>(OC, 0.0f));
  cuda::bias_grad(db1.get(), dout.get(), N, OC);
  cuda::bias_grad(db2.get(), dout.get(), N, OC);
  EXPECT_EQ(db1.host(), db2.host());
}

struct AttnCase {
  int64_t B, T, NH, NKV, HS, window;
  int64_t doc = 0;       // > 0: packed rows of documents of doc, 1 and 2 doc + 5 tokens, cycled
  AttnScore score = {};  // Gemma's scale and soft-capping
};

// Each position's document start for packed rows (cpu/kernels.h), or empty.
std::vector<int32_t> doc_starts(const AttnCase& c) {
  std::vector<int32_t> ds;
  if (c.doc <= 0) return ds;
  const int64_t lengths[] = {c.doc, 1, 2 * c.doc + 5};
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0, k = b; t < c.T; ++k) {
      const int64_t n = std::min(lengths[k % 3], c.T - t);
      for (int64_t i = 0; i < n; ++i) ds.push_back(static_cast<int32_t>(t));
      t += n;
    }
  return ds;
}

TEST(CudaAttention, ForwardBackwardMatchCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const AttnCase cases[] = {
      {2, 200, 4, 2, 64, 0},   // four query tiles, the last partial
      {2, 200, 4, 2, 64, 37},  // window: whole key tiles skipped
      {2, 100, 4, 2, 32, 0},
      {2, 100, 4, 2, 32, 37},
      {1, 77, 2, 1, 80, 5},  // HS 80 padded to 128, MQA, a window shorter than a tile
      {1, 1, 4, 2, 16, 0},   // a single position
      // packed rows: documents crossing tiles, single tokens, with and without a window
      {2, 200, 4, 2, 64, 0, 70},
      {2, 200, 4, 2, 64, 37, 50},
      {1, 77, 2, 1, 80, 5, 9},
      // Gemma: scores scaled by 24^-1/2 and soft-capped at 1 (random inputs give scores ~3)
      {2, 200, 4, 2, 64, 0, 0, {24, 1.0f}},
      {2, 200, 4, 2, 32, 37, 50, {24, 1.0f}},
  };
  uint64_t seed = 500;
  for (const AttnCase& c : cases) {
    const int64_t Cq = (c.NH + 2 * c.NKV) * c.HS, Co = c.NH * c.HS;
    const std::vector<float> qkv = randn(c.B * c.T * Cq, ++seed),
                             dout = randn(c.B * c.T * Co, ++seed);
    std::vector<float> out(c.B * c.T * Co), lse(c.B * c.NH * c.T), dqkv(c.B * c.T * Cq, 0.0f);
    const std::vector<int32_t> ds = doc_starts(c);
    const int32_t* h_ds = ds.empty() ? nullptr : ds.data();
    cpu::attention_forward<float>(out.data(), lse.data(), qkv.data(), c.B, c.T, c.NH, c.NKV, c.HS,
                                  c.window, h_ds, c.score);
    cpu::attention_backward<float>(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(),
                                   c.B, c.T, c.NH, c.NKV, c.HS, c.window, h_ds, c.score);

    DeviceArray<float> d_qkv(qkv), d_dout(dout), d_out(out.size()), d_lse(lse.size()),
        d_dqkv(std::vector<float>(dqkv.size(), 0.0f));
    DeviceArray<int32_t> d_ds(ds.empty() ? std::vector<int32_t>{0} : ds);
    const int32_t* g_ds = ds.empty() ? nullptr : d_ds.get();
    cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), c.B, c.T, c.NH, c.NKV, c.HS,
                            c.window, g_ds, c.score);
    cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(), c.B,
                             c.T, c.NH, c.NKV, c.HS, c.window, g_ds, c.score);
    const std::string tag =
        fmt::format("B={} T={} NH={} NKV={} HS={} window={} doc={} softcap={}", c.B, c.T, c.NH,
                    c.NKV, c.HS, c.window, c.doc, c.score.softcap);
    EXPECT_TRUE(parity("attention out " + tag, d_out.host(), out, kTol.attention));
    EXPECT_TRUE(parity("attention lse " + tag, d_lse.host(), lse, kTol.attention));
    const std::vector<float> g1 = d_dqkv.host();
    EXPECT_TRUE(parity("attention dqkv " + tag, g1, dqkv, kTol.attention_grad));

    // Backward adds, and adds the same bits again: exactly twice the first gradient.
    cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(), c.B,
                             c.T, c.NH, c.NKV, c.HS, c.window, g_ds, c.score);
    const std::vector<float> g2 = d_dqkv.host();
    size_t mismatches = 0;
    for (size_t i = 0; i < g1.size(); ++i) mismatches += g2[i] != 2.0f * g1[i];
    EXPECT_EQ(mismatches, 0u) << "attention backward not deterministic/accumulating, " << tag;
  }
}

TEST(CudaAttention, RejectsHeadSizeAbove128) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  EXPECT_THROW(cuda::attention_forward(nullptr, nullptr, nullptr, 1, 8, 2, 1, 256, 0), Error);
}

}  // namespace
}  // namespace lmforge
