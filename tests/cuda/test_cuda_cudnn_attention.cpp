// cuDNN fused flash attention (backend/cuda/cudnn_attention.h) against the fp32 attention kernels
// (backend/cuda/attention.h) on random inputs: GPT-2-like heads (NH = NKV), GQA (NH = 8 over
// NKV = 2) and MQA, head sizes 32, 64 and 128, T not a multiple of 64 (or 128), B > 1. The
// backward starts from a non-zero dqkv, so it must add. Also: which path ops::attention_* take
// (cuDNN only under bf16 and without a window), and the shapes cudnn_attention_supported accepts.
//
// Inputs (qkv, dout) are random values already rounded to bf16, so both paths see the same
// numbers and what differs is cuDNN's bf16 rounding inside: P and dS enter the second matmuls as
// bf16, O is stored as bf16 (and its row sums dO.O use it), dQ/dK/dV are stored as bf16. The
// measure is testing/compare.h's normalised error max|cudnn - fp32| / max|fp32| per tensor
// (dQ, dK and dV separately). Skips without a GPU, except the shape rules.
#include <cudnn_graph.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "lmforge/backend/cuda/attention.h"
#include "lmforge/backend/cuda/cudnn_attention.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/core/tensor.h"
#include "testing/compare.h"
#include "testing/cuda.h"

namespace lmforge {
namespace {

// Tolerances (normalised error) for bf16 attention against the fp32 kernel on the same inputs.
struct Tolerances {
  double out = 1e-2;   // O stored in bf16 (2^-9 relative) after a bf16 P @ V: a few 1e-3 expected
  double lse = 1e-3;   // fp32 statistics from the same bf16 inputs: only summation order / exp
  double grad = 2e-2;  // dQ, dK, dV: bf16 P and dS in the matmuls, bf16 O in dO.O, bf16 results
};
constexpr Tolerances kTol;

using testing::DeviceArray;

// Normal random values rounded to bf16 (exact in both paths).
std::vector<float> randn_bf16(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = bf16_to_fp32(fp32_to_bf16_ftz(static_cast<float>(rng.normal())));
  return v;
}

using testing::parity;

struct Case {
  int64_t B, T, NH, NKV, HS;
};

// Columns [c0, c0 + width) of every row of a (rows, row_width) matrix: the q, k or v part of
// a dqkv, minus the same part of the starting value d0 (what the backward added).
std::vector<float> added_part(const std::vector<float>& g, const std::vector<float>& d0,
                              int64_t row_width, int64_t c0, int64_t width) {
  std::vector<float> r;
  const int64_t rows = static_cast<int64_t>(g.size()) / row_width;
  r.reserve(static_cast<size_t>(rows * width));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = c0; c < c0 + width; ++c)
      r.push_back(g[i * row_width + c] - d0[i * row_width + c]);
  return r;
}

TEST(CudaCudnnAttention, MatchesTheFp32Kernel) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const Case cases[] = {
      {2, 200, 4, 4, 64},    // NH == NKV; T neither a multiple of 64 nor of 128
      {2, 256, 12, 12, 64},  // GPT-2 small's heads
      {2, 130, 8, 2, 128},   // GQA 8 over 2, HS 128
      {3, 77, 8, 2, 64},     // GQA, B = 3, a short odd T
      {1, 96, 4, 1, 32},     // MQA, HS 32
  };
  uint64_t seed = 900;
  for (const Case& c : cases) {
    const std::string tag =
        fmt::format("B={} T={} NH={} NKV={} HS={}", c.B, c.T, c.NH, c.NKV, c.HS);
    if (!cuda::cudnn_attention_supported(c.B, c.T, c.NH, c.NKV, c.HS, 0)) {
      // Only a cuDNN older than 9.16 refuses these (T not a multiple of 128).
      EXPECT_LT(cudnnGetVersion(), 91600u) << tag;
      continue;
    }
    const int64_t W = (c.NH + 2 * c.NKV) * c.HS, Co = c.NH * c.HS;
    const std::vector<float> qkv = randn_bf16(c.B * c.T * W, ++seed),
                             dout = randn_bf16(c.B * c.T * Co, ++seed),
                             d0 = randn_bf16(c.B * c.T * W, ++seed);
    DeviceArray<float> d_qkv(qkv), d_dout(dout);

    // The fp32 kernels: the reference.
    DeviceArray<float> r_out(c.B * c.T * Co), r_lse(c.B * c.NH * c.T), r_dqkv(d0);
    cuda::attention_forward(r_out.get(), r_lse.get(), d_qkv.get(), c.B, c.T, c.NH, c.NKV, c.HS, 0);
    cuda::attention_backward(r_dqkv.get(), d_dout.get(), d_qkv.get(), r_out.get(), r_lse.get(), c.B,
                             c.T, c.NH, c.NKV, c.HS, 0);

    // cuDNN, its backward fed its own forward's out and lse (as in training).
    DeviceArray<float> out(c.B * c.T * Co), lse(c.B * c.NH * c.T), dqkv(d0);
    ASSERT_TRUE(cuda::cudnn_attention_forward(out.get(), lse.get(), d_qkv.get(), c.B, c.T, c.NH,
                                              c.NKV, c.HS))
        << "cuDNN built no forward plan for " << tag << " (see the warning above)";
    ASSERT_TRUE(cuda::cudnn_attention_backward(dqkv.get(), d_dout.get(), d_qkv.get(), out.get(),
                                               lse.get(), c.B, c.T, c.NH, c.NKV, c.HS))
        << "cuDNN built no backward plan for " << tag << " (see the warning above)";

    const std::vector<float> got_out = out.host(), got_lse = lse.host();
    EXPECT_TRUE(parity("out " + tag, got_out, r_out.host(), kTol.out));
    EXPECT_TRUE(parity("lse " + tag, got_lse, r_lse.host(), kTol.lse));
    const std::vector<float> g = dqkv.host(), want = r_dqkv.host();
    const int64_t kv0 = c.NH * c.HS, v0 = (c.NH + c.NKV) * c.HS, kvw = c.NKV * c.HS;
    EXPECT_TRUE(parity("dQ " + tag, added_part(g, d0, W, 0, kv0), added_part(want, d0, W, 0, kv0),
                       kTol.grad));
    EXPECT_TRUE(parity("dK " + tag, added_part(g, d0, W, kv0, kvw),
                       added_part(want, d0, W, kv0, kvw), kTol.grad));
    EXPECT_TRUE(parity("dV " + tag, added_part(g, d0, W, v0, kvw), added_part(want, d0, W, v0, kvw),
                       kTol.grad));

    // The cached plan again: the forward is deterministic, bit for bit.
    DeviceArray<float> out2(c.B * c.T * Co), lse2(c.B * c.NH * c.T);
    ASSERT_TRUE(cuda::cudnn_attention_forward(out2.get(), lse2.get(), d_qkv.get(), c.B, c.T, c.NH,
                                              c.NKV, c.HS));
    EXPECT_EQ(out2.host(), got_out) << tag;
    EXPECT_EQ(lse2.host(), got_lse) << tag;
  }
}

Tensor cuda_tensor(const std::vector<float>& v, Shape shape) {
  Tensor t = Tensor::empty(shape, DType::kF32);
  std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));
  return t.to(Device::kCUDA);
}

std::vector<float> host_values(const Tensor& t) {
  const Tensor h = t.to(Device::kCPU);
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

// ops::attention_forward takes cuDNN only with bf16 = true (unless LMFORGE_CUDNN_ATTENTION=0)
// and without a window; otherwise the fp32 kernel, bit for bit.
TEST(CudaCudnnAttention, OpsSelectTheBf16PathUnderMixedPrecision) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t B = 2, T = 128, NH = 4, NKV = 2, HS = 64, W = (NH + 2 * NKV) * HS;
  ASSERT_TRUE(cuda::cudnn_attention_supported(B, T, NH, NKV, HS, 0));
  const std::vector<float> qkv_v = randn_bf16(B * T * W, 77);
  const Tensor qkv = cuda_tensor(qkv_v, {B, T, W});
  auto run = [&](bool bf16, int64_t window) {
    Tensor out = Tensor::empty({B, T, NH * HS}, DType::kF32, Device::kCUDA);
    Tensor lse = Tensor::empty({B, NH, T}, DType::kF32, Device::kCUDA);
    ops::attention_forward(out, lse, qkv, NH, NKV, window, bf16);
    return host_values(out);
  };
  DeviceArray<float> d_qkv(qkv_v), fp32_out(B * T * NH * HS), fp32_lse(B * NH * T),
      bf16_out(B * T * NH * HS), bf16_lse(B * NH * T);
  cuda::attention_forward(fp32_out.get(), fp32_lse.get(), d_qkv.get(), B, T, NH, NKV, HS, 0);
  ASSERT_TRUE(cuda::cudnn_attention_forward(bf16_out.get(), bf16_lse.get(), d_qkv.get(), B, T, NH,
                                            NKV, HS));
  EXPECT_EQ(run(false, 0), fp32_out.host());
  EXPECT_EQ(run(true, 0), cuda::cudnn_attention_enabled() ? bf16_out.host() : fp32_out.host());
  // A sliding window is not taken by cuDNN here: the fp32 kernel, with or without bf16.
  DeviceArray<float> win_out(B * T * NH * HS), win_lse(B * NH * T);
  cuda::attention_forward(win_out.get(), win_lse.get(), d_qkv.get(), B, T, NH, NKV, HS, 37);
  EXPECT_EQ(run(true, 37), win_out.host());
}

// bf16 activations: the overloads taking bf16 qkv / out run the same plans as the fp32 wrappers,
// minus the conversions, which are exact on bf16 values. So on bf16-valued inputs the bf16 out is
// the fp32 wrapper's out (a widened bf16 O) rounded, bit for bit, lse is the same, and the
// backward adds the same dK and dV (dQ to cuDNN's run-to-run atomics, see cudnn_attention.h).
TEST(CudaCudnnAttention, Bf16OverloadsAreTheFp32WrappersWithoutConversions) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t B = 2, T = 128, NH = 4, NKV = 2, HS = 64, W = (NH + 2 * NKV) * HS,
                n_out = B * T * NH * HS;
  if (!cuda::cudnn_attention_supported(B, T, NH, NKV, HS, 0)) GTEST_SKIP() << "cuDNN too old";
  const std::vector<float> qkv = randn_bf16(B * T * W, 91), dout = randn_bf16(n_out, 92),
                           d0 = randn_bf16(B * T * W, 93);
  std::vector<uint16_t> qkv16(qkv.size());
  for (size_t i = 0; i < qkv.size(); ++i) qkv16[i] = fp32_to_bf16_ftz(qkv[i]);
  DeviceArray<float> d_qkv(qkv), out32(n_out), lse32(B * NH * T), lse16(B * NH * T), d_dout(dout),
      dq32(d0), dq16(d0);
  DeviceArray<uint16_t> d_qkv16(qkv16), out16{std::vector<uint16_t>(n_out)};
  ASSERT_TRUE(
      cuda::cudnn_attention_forward(out32.get(), lse32.get(), d_qkv.get(), B, T, NH, NKV, HS));
  ASSERT_TRUE(
      cuda::cudnn_attention_forward(out16.get(), lse16.get(), d_qkv16.get(), B, T, NH, NKV, HS));
  const std::vector<float> o32 = out32.host();
  const std::vector<uint16_t> o16 = out16.host();
  for (int64_t i = 0; i < n_out; ++i) ASSERT_EQ(o16[i], fp32_to_bf16_ftz(o32[i])) << i;
  EXPECT_EQ(lse16.host(), lse32.host());
  ASSERT_TRUE(cuda::cudnn_attention_backward(dq32.get(), d_dout.get(), d_qkv.get(), out32.get(),
                                             lse32.get(), B, T, NH, NKV, HS));
  ASSERT_TRUE(cuda::cudnn_attention_backward(dq16.get(), d_dout.get(), d_qkv16.get(), out16.get(),
                                             lse16.get(), B, T, NH, NKV, HS));
  const std::vector<float> g32 = dq32.host(), g16 = dq16.host();
  EXPECT_EQ(added_part(g16, d0, W, NH * HS, 2 * NKV * HS),
            added_part(g32, d0, W, NH * HS, 2 * NKV * HS));  // dK, dV
  EXPECT_TRUE(
      parity("dQ", added_part(g16, d0, W, 0, NH * HS), added_part(g32, d0, W, 0, NH * HS), 1e-2));
  // bf16 dout and dqkv (bf16 attention gradients): dqkv written, i.e. what the fp32 wrapper adds
  // into a zero dqkv (a widened bf16 value, exactly), rounded.
  std::vector<uint16_t> dout16(dout.size());
  for (size_t i = 0; i < dout.size(); ++i) dout16[i] = fp32_to_bf16_ftz(dout[i]);
  const std::vector<float> zero(qkv.size(), 0.0f);
  DeviceArray<float> dz(zero);
  DeviceArray<uint16_t> d_dout16(dout16), dq_b16{std::vector<uint16_t>(qkv.size(), 0x7f7f)};
  ASSERT_TRUE(cuda::cudnn_attention_backward(dz.get(), d_dout.get(), d_qkv.get(), out32.get(),
                                             lse32.get(), B, T, NH, NKV, HS));
  ASSERT_TRUE(cuda::cudnn_attention_backward(dq_b16.get(), d_dout16.get(), d_qkv16.get(),
                                             out16.get(), lse16.get(), B, T, NH, NKV, HS));
  const std::vector<float> gz = dz.host();
  std::vector<float> gb(gz.size());
  const std::vector<uint16_t> b16 = dq_b16.host();
  for (size_t i = 0; i < gb.size(); ++i) gb[i] = bf16_to_fp32(b16[i]);
  EXPECT_EQ(added_part(gb, zero, W, NH * HS, 2 * NKV * HS),
            added_part(gz, zero, W, NH * HS, 2 * NKV * HS));  // dK, dV
  EXPECT_TRUE(parity("dQ (bf16)", added_part(gb, zero, W, 0, NH * HS),
                     added_part(gz, zero, W, 0, NH * HS), 1e-2));
}

// The shape rules need no GPU: they read only cuDNN's version.
TEST(CudaCudnnAttention, SupportedShapes) {
  EXPECT_FALSE(cuda::cudnn_attention_supported(2, 256, 12, 12, 64, 37));  // a sliding window
  EXPECT_FALSE(cuda::cudnn_attention_supported(2, 256, 12, 12, 20, 0));   // HS not a multiple of 8
  EXPECT_FALSE(cuda::cudnn_attention_supported(2, 256, 2, 1, 256, 0));    // HS above 128
  EXPECT_FALSE(cuda::cudnn_attention_supported(2, 256, 6, 4, 64, 0));     // NH not a multiple
  EXPECT_FALSE(cuda::cudnn_attention_supported(2, 1, 12, 12, 64, 0));     // T = 1 (no backward)
  EXPECT_FALSE(cuda::cudnn_attention_supported(0, 256, 12, 12, 64, 0));   // empty
  const size_t v = cudnnGetVersion();
  if (v < 90000 || v == 91000 || v == 91001) {
    EXPECT_FALSE(cuda::cudnn_attention_supported(2, 256, 12, 12, 64, 0)) << "cuDNN " << v;
    return;
  }
  EXPECT_TRUE(cuda::cudnn_attention_supported(2, 256, 12, 12, 64, 0));   // GPT-2 small
  EXPECT_TRUE(cuda::cudnn_attention_supported(1, 1024, 32, 8, 128, 0));  // Llama-like GQA
  EXPECT_TRUE(cuda::cudnn_attention_supported(1, 256, 4, 2, 80, 0));     // HS 80
  EXPECT_EQ(cuda::cudnn_attention_supported(2, 200, 4, 4, 64, 0), v >= 91600) << "cuDNN " << v;
}

}  // namespace
}  // namespace lmforge
