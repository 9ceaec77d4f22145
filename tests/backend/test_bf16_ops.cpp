// Ops on bf16 activations (the bf16 matmul outputs of train.precision: bf16): each computes what
// its fp32 path computes on the widened values and rounds its output once.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <string>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "testing/random.h"

namespace lmforge {
namespace {

using testing::randn;
// bf16 activations: the norms and activation functions writing a bf16 output give exactly
// to_bf16 of their fp32 output (the row blocks of ops' CPU path included: N spans several), and
// the statistics saved for backward are the fp32 path's.
TEST(Bf16, ForwardsWithBf16OutputRoundTheirFp32Output) {
  const int64_t N = 9000, C = 64;  // 4096 rows per block at C = 64: three blocks
  Tensor x = Tensor::empty({N, C}, DType::kF32), x2 = Tensor::empty({N, 2 * C}, DType::kF32);
  Tensor w = Tensor::empty({C}, DType::kF32), b = Tensor::empty({C}, DType::kF32);
  auto fill = [](const Tensor& t, uint64_t seed) {
    std::vector<float> v = randn(t.numel(), seed);
    std::memcpy(t.raw(), v.data(), t.nbytes());
  };
  fill(x, 1);
  fill(x2, 2);
  fill(w, 3);
  fill(b, 4);
  auto same = [](const char* what, const Tensor& f32, const Tensor& b16) {
    Tensor want = Tensor::empty(f32.shape(), DType::kBF16);
    ops::to_bf16(want, f32);
    EXPECT_EQ(std::memcmp(want.raw(), b16.raw(), want.nbytes()), 0) << what;
  };
  Tensor out = Tensor::empty({N, C}, DType::kF32), out16 = Tensor::empty({N, C}, DType::kBF16);
  Tensor m1 = Tensor::empty({N}, DType::kF32), r1 = Tensor::empty({N}, DType::kF32),
         m2 = Tensor::empty({N}, DType::kF32), r2 = Tensor::empty({N}, DType::kF32);
  ops::layernorm_forward(out, m1, r1, x, w, b, 1e-5);
  ops::layernorm_forward(out16, m2, r2, x, w, b, 1e-5);
  same("layernorm", out, out16);
  EXPECT_EQ(std::memcmp(m1.raw(), m2.raw(), m1.nbytes()), 0);
  EXPECT_EQ(std::memcmp(r1.raw(), r2.raw(), r1.nbytes()), 0);
  ops::rmsnorm_forward(out, r1, x, w, 1e-6);
  ops::rmsnorm_forward(out16, r2, x, w, 1e-6);
  same("rmsnorm", out, out16);
  EXPECT_EQ(std::memcmp(r1.raw(), r2.raw(), r1.nbytes()), 0);
  ops::gelu_forward(out, x);
  ops::gelu_forward(out16, x);
  same("gelu", out, out16);
  for (Gate gate : {Gate::kSilu, Gate::kGelu}) {
    ops::glu_forward(out, x2, gate);
    ops::glu_forward(out16, x2, gate);
    same(gate == Gate::kSilu ? "swiglu" : "geglu", out, out16);
  }
  // A bf16 input goes into the matmul as it is: the same as the fp32 input it rounds.
  Tensor w16 = Tensor::empty({32, C}, DType::kBF16), y1 = Tensor::empty({N, 32}, DType::kF32),
         y2 = Tensor::empty({N, 32}, DType::kF32), wf = Tensor::empty({32, C}, DType::kF32);
  fill(wf, 5);
  ops::to_bf16(w16, wf);
  ops::linear_forward(y1, out, w16, Tensor());
  ops::linear_forward(y2, out16, w16, Tensor());
  EXPECT_EQ(std::memcmp(y1.raw(), y2.raw(), y1.nbytes()), 0);
  Tensor g = Tensor::empty({N, 32}, DType::kF32), dw1 = Tensor::zeros({32, C}, DType::kF32),
         dw2 = Tensor::zeros({32, C}, DType::kF32);
  fill(g, 6);
  ops::linear_backward(Tensor(), dw1, Tensor(), g, out, w16);
  ops::linear_backward(Tensor(), dw2, Tensor(), g, out16, w16);
  EXPECT_EQ(std::memcmp(dw1.raw(), dw2.raw(), dw1.nbytes()), 0);

  // The loss's backward writing bf16 dlogits, rows padded (ld 104 for V = 97): each row is
  // to_bf16 of the fp32 one, the padding untouched; the LM head's backward takes them as they are.
  const int64_t R = 40, V = 97, ld = 104;
  Tensor logits = Tensor::empty({R, V}, DType::kF32), tg = Tensor::empty({R}, DType::kI32);
  fill(logits, 7);
  for (int64_t i = 0; i < R; ++i)
    tg.data<int32_t>()[i] = i == 3 ? -100 : static_cast<int32_t>(i * 5 % V);
  Tensor d32 = Tensor::empty({R, V}, DType::kF32), d16 = Tensor::empty({R, ld}, DType::kBF16);
  std::memset(d16.raw(), 0xab, d16.nbytes());
  ops::softmax_xent_backward(d32, logits, tg, 0.25, -100, 1e-4);
  ops::softmax_xent_backward(d16, logits, tg, 0.25, -100, 1e-4);
  Tensor want = Tensor::empty({R, V}, DType::kBF16);
  ops::to_bf16(want, d32);
  for (int64_t i = 0; i < R; ++i) {
    ASSERT_EQ(std::memcmp(want.bf16_data() + i * V, d16.bf16_data() + i * ld, V * 2), 0) << i;
    for (int64_t v = V; v < ld; ++v) ASSERT_EQ(d16.bf16_data()[i * ld + v], 0xabab);
  }
  // The fused forward + backward (training): the same losses, dlogits and lse^2 sum bit for bit,
  // fp32 in place and bf16 padded alike.
  Tensor l1 = Tensor::empty({R}, DType::kF32), l2 = Tensor::empty({R}, DType::kF32),
         z1 = Tensor::empty({1}, DType::kF64), z2 = Tensor::empty({1}, DType::kF64),
         inplace = logits.clone(), f16 = Tensor::empty({R, ld}, DType::kBF16);
  ops::softmax_xent_rows(l1, logits, tg, -100, z1);
  ops::softmax_xent_forward_backward(l2, z2, inplace, inplace, tg, -100, 0.25, 1e-4);
  EXPECT_EQ(std::memcmp(l1.raw(), l2.raw(), l1.nbytes()), 0);
  EXPECT_EQ(std::memcmp(inplace.raw(), d32.raw(), d32.nbytes()), 0);
  EXPECT_EQ(z2.data<double>()[0], z1.data<double>()[0]);
  ops::softmax_xent_forward_backward(l2, z2, f16, logits, tg, -100, 0.25, 1e-4);
  EXPECT_EQ(std::memcmp(l1.raw(), l2.raw(), l1.nbytes()), 0);
  for (int64_t i = 0; i < R; ++i)
    ASSERT_EQ(std::memcmp(f16.bf16_data() + i * ld, d16.bf16_data() + i * ld, V * 2), 0) << i;
  EXPECT_EQ(z2.data<double>()[0], z1.data<double>()[0]);
  // The lse^2 sum (a logged metric) adds the rows in order, whatever the thread count (rows of
  // very different scales: any other grouping of the sum changes its last bits).
  {
    const int64_t R2 = 203;
    Tensor lg = Tensor::empty({R2, V}, DType::kF32), t2 = Tensor::empty({R2}, DType::kI32),
           l3 = Tensor::empty({R2}, DType::kF32);
    fill(lg, 9);
    for (int64_t i = 0; i < R2; ++i) {
      for (int64_t v = 0; v < V; ++v) lg.data<float>()[i * V + v] *= 1.0f + 0.37f * (i % 11);
      t2.data<int32_t>()[i] = static_cast<int32_t>(i * 7 % V);
    }
    const int before = omp_get_max_threads();
    std::vector<double> sums;
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      ops::softmax_xent_rows(l3, lg, t2, -100, z1);
      sums.push_back(z1.data<double>()[0]);
    }
    omp_set_num_threads(before);
    EXPECT_EQ(sums[0], sums[1]);
    EXPECT_EQ(sums[0], sums[2]);
  }

  Tensor h16 = Tensor::empty({R, C}, DType::kBF16), hw = Tensor::empty({V, C}, DType::kF32),
         hw16 = Tensor::empty({V, C}, DType::kBF16);
  std::memcpy(h16.raw(), out16.raw(), h16.nbytes());
  fill(hw, 8);
  ops::to_bf16(hw16, hw);
  Tensor dh1 = Tensor::zeros({R, C}, DType::kF32), dh2 = Tensor::zeros({R, C}, DType::kF32),
         dhw1 = Tensor::zeros({V, C}, DType::kF32), dhw2 = Tensor::zeros({V, C}, DType::kF32);
  ops::linear_backward(dh1, dhw1, Tensor(), d32, h16, hw16);
  ops::linear_backward(dh2, dhw2, Tensor(), d16, h16, hw16);
  EXPECT_EQ(std::memcmp(dh1.raw(), dh2.raw(), dh1.nbytes()), 0);
  EXPECT_EQ(std::memcmp(dhw1.raw(), dhw2.raw(), dhw1.nbytes()), 0);
}

// bf16 matmul outputs: each op on bf16 activations computes what its fp32 path computes on the
// widened values and rounds once (to_bf16): the matmul's bf16 output is the fp32 output rounded
// (bias included), the activations read bf16 and their backwards write d(inp) rounded, RoPE
// rotates q and k and leaves v's bits alone, the residual add widens, attention reads and writes
// bf16, and a bf16 output gradient with a bias gives the bias gradient of its widened values.
TEST(Bf16, OpsOnBf16MatmulOutputsRoundTheFp32PathOnce) {
  auto filled = [](Shape shape, DType dt, uint64_t seed, double scale = 1.0) {
    Tensor f = Tensor::empty(shape, DType::kF32);
    std::vector<float> v = randn(f.numel(), seed, scale);
    std::memcpy(f.raw(), v.data(), f.nbytes());
    if (dt == DType::kF32) return f;
    Tensor h = Tensor::empty(shape, DType::kBF16);
    ops::to_bf16(h, f);
    return h;
  };
  auto widen = [](const Tensor& h) {
    Tensor f = Tensor::empty(h.shape(), DType::kF32);
    ops::from_bf16(f, h);
    return f;
  };
  auto rounded = [](const Tensor& f) {
    Tensor h = Tensor::empty(f.shape(), DType::kBF16);
    ops::to_bf16(h, f);
    return h;
  };
  auto same = [](const char* what, const Tensor& a, const Tensor& b) {
    ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << what;
  };
  const int64_t N = 300, C = 64, OC = 96;
  // The matmul: bf16 out = the fp32 out rounded, with and without bias, bf16 or fp32 input.
  Tensor x16 = filled({N, C}, DType::kBF16, 1), w16 = filled({OC, C}, DType::kBF16, 2, 0.1),
         bias = filled({OC}, DType::kF32, 3);
  Tensor y32 = Tensor::empty({N, OC}, DType::kF32), y16 = Tensor::empty({N, OC}, DType::kBF16);
  for (const Tensor& b : {bias, Tensor()}) {
    ops::linear_forward(y32, x16, w16, b);
    ops::linear_forward(y16, x16, w16, b);
    // oneDNN may block the sums differently for a bf16 destination: within one bf16 ulp of the
    // fp32 result (plus fp32 summation noise near zero), and mostly its rounding exactly.
    const uint16_t* got = y16.bf16_data();
    const Tensor want = rounded(y32);
    auto within_ulp = [&] {
      int64_t off = 0;
      for (int64_t i = 0; i < y16.numel(); ++i) {
        const float y = y32.data<float>()[i];
        const double ulp = std::ldexp(1.0, std::ilogb(y) - 7) + 1e-5;
        EXPECT_LE(std::fabs(bf16_to_fp32(got[i]) - y), ulp) << i;
        off += got[i] != want.bf16_data()[i];
      }
      EXPECT_LE(off, y16.numel() / 100);
    };
    within_ulp();
    ops::linear_forward(y16, widen(x16), w16, b);  // an fp32 input is rounded on its way in
    within_ulp();
  }

  // The backward of a bf16 output gradient with a bias: as the fp32 gradient it widens from.
  Tensor g16 = filled({N, OC}, DType::kBF16, 4);
  Tensor dx1 = Tensor::zeros({N, C}, DType::kF32), dx2 = Tensor::zeros({N, C}, DType::kF32),
         dw1 = Tensor::zeros({OC, C}, DType::kF32), dw2 = Tensor::zeros({OC, C}, DType::kF32),
         db1 = Tensor::zeros({OC}, DType::kF32), db2 = Tensor::zeros({OC}, DType::kF32);
  ops::linear_backward(dx1, dw1, db1, widen(g16), x16, w16);
  ops::linear_backward(dx2, dw2, db2, g16, x16, w16);
  same("dinp", dx1, dx2);
  same("dweight", dw1, dw2);
  same("dbias", db1, db2);
  // A bf16 dinp (attention's d(att)) is written: the fp32 dinp from zero, rounded once (within an
  // ulp, as the forward); dweight and dbias as with an fp32 dinp.
  Tensor gf = filled({N, OC}, DType::kF32, 11);
  Tensor dx16 = Tensor::empty({N, C}, DType::kBF16), dx32 = Tensor::zeros({N, C}, DType::kF32),
         dw3 = Tensor::zeros({OC, C}, DType::kF32), dw4 = Tensor::zeros({OC, C}, DType::kF32),
         db3 = Tensor::zeros({OC}, DType::kF32), db4 = Tensor::zeros({OC}, DType::kF32);
  std::memset(dx16.raw(), 0x7f, dx16.nbytes());
  ops::linear_backward(dx32, dw3, db3, gf, x16, w16);
  ops::linear_backward(dx16, dw4, db4, gf, x16, w16);
  same("dweight with a bf16 dinp", dw3, dw4);
  same("dbias with a bf16 dinp", db3, db4);
  for (int64_t i = 0; i < dx16.numel(); ++i) {
    const float y = dx32.data<float>()[i];
    ASSERT_LE(std::fabs(bf16_to_fp32(dx16.bf16_data()[i]) - y),
              std::ldexp(1.0, std::ilogb(y) - 7) + 1e-5)
        << i;
  }

  // GELU and SwiGLU on bf16 inputs (several of the CPU path's row blocks).
  const int64_t R = 9000, F = 64;
  Tensor a16 = filled({R, F}, DType::kBF16, 5), a2_16 = filled({R, 2 * F}, DType::kBF16, 6);
  Tensor dy = filled({R, F}, DType::kF32, 7);
  Tensor o32 = Tensor::empty({R, F}, DType::kF32), o16 = Tensor::empty({R, F}, DType::kBF16);
  ops::gelu_forward(o32, widen(a16));
  ops::gelu_forward(o16, a16);
  same("gelu", rounded(o32), o16);
  Tensor d32 = Tensor::zeros({R, F}, DType::kF32), d16 = Tensor::empty({R, F}, DType::kBF16);
  std::memset(d16.raw(), 0x7f, d16.nbytes());  // written, not added to
  ops::gelu_backward(d32, widen(a16), dy);
  ops::gelu_backward(d16, a16, dy);
  same("gelu backward", rounded(d32), d16);
  for (Gate gate : {Gate::kSilu, Gate::kGelu}) {
    const std::string name = gate == Gate::kSilu ? "swiglu" : "geglu";
    ops::glu_forward(o32, widen(a2_16), gate);
    ops::glu_forward(o16, a2_16, gate);
    same(name.c_str(), rounded(o32), o16);
    Tensor s32 = Tensor::zeros({R, 2 * F}, DType::kF32),
           s16 = Tensor::empty({R, 2 * F}, DType::kBF16);
    std::memset(s16.raw(), 0x7f, s16.nbytes());
    ops::glu_backward(s32, widen(a2_16), dy, gate);
    ops::glu_backward(s16, a2_16, dy, gate);
    same((name + " backward").c_str(), rounded(s32), s16);
  }

  // The residual add of a bf16 branch.
  Tensor res = filled({R, F}, DType::kF32, 8), sum1 = Tensor::empty({R, F}, DType::kF32),
         sum2 = Tensor::empty({R, F}, DType::kF32);
  ops::add(sum1, res, widen(a16));
  ops::add(sum2, res, a16);
  same("add", sum1, sum2);

  // RoPE on a bf16 qkv (GQA: NH = 4, NKV = 2, HS = 16), at an offset position, T spanning
  // several row blocks of a sequence.
  const int64_t B = 2, T = 300, NH = 4, NKV = 2, HS = 16, Cq = (NH + 2 * NKV) * HS;
  Tensor cos = Tensor::empty({T + 5, HS / 2}, DType::kF32), sin = cos.clone();
  for (int64_t t = 0; t < T + 5; ++t)
    for (int64_t i = 0; i < HS / 2; ++i) {
      const double a = t / std::pow(10000.0, 2.0 * i / HS);
      cos.data<float>()[t * HS / 2 + i] = static_cast<float>(std::cos(a));
      sin.data<float>()[t * HS / 2 + i] = static_cast<float>(std::sin(a));
    }
  Tensor q16 = filled({B, T, Cq}, DType::kBF16, 9), q32 = widen(q16);
  const Tensor v_before = q16.clone();
  ops::rope_forward(q32, cos, sin, NH, NKV, 5);
  ops::rope_forward(q16, cos, sin, NH, NKV, 5);
  same("rope", rounded(q32), q16);
  Tensor r16 = q16.clone(), r32 = widen(r16);  // the backward (a bf16 dqkv) likewise
  ops::rope_backward(r32, cos, sin, NH, NKV, 5);
  ops::rope_backward(r16, cos, sin, NH, NKV, 5);
  same("rope backward", rounded(r32), r16);
  for (int64_t r = 0; r < B * T; ++r)
    ASSERT_EQ(std::memcmp(q16.bf16_data() + r * Cq + (NH + NKV) * HS,
                          v_before.bf16_data() + r * Cq + (NH + NKV) * HS, NKV * HS * 2),
              0);

  // Attention on a bf16 qkv writes a bf16 out; its backward takes them with fp32 dout. Where
  // oneDNN has bf16 matmuls (AVX512-BF16 / AMX) its tile products run in bf16 instead
  // (FlashAttention.Bf16Tiles* test that path against the double reference): not this test's.
  cpu::set_bf16_attention_tiles(false);
  Tensor out32 = Tensor::empty({B, T, NH * HS}, DType::kF32),
         out16 = Tensor::empty({B, T, NH * HS}, DType::kBF16),
         lse1 = Tensor::empty({B, NH, T}, DType::kF32), lse2 = lse1.clone();
  ops::attention_forward(out32, lse1, widen(q16), NH, NKV);
  ops::attention_forward(out16, lse2, q16, NH, NKV, 0, true);
  same("attention", rounded(out32), out16);
  same("lse", lse1, lse2);
  Tensor dout = filled({B, T, NH * HS}, DType::kF32, 10);
  Tensor dq1 = Tensor::zeros({B, T, Cq}, DType::kF32), dq2 = Tensor::zeros({B, T, Cq}, DType::kF32);
  ops::attention_backward(dq1, dout, widen(q16), widen(out16), lse1, NH, NKV);
  ops::attention_backward(dq2, dout, q16, out16, lse2, NH, NKV, 0, true);
  same("attention backward", dq1, dq2);
  // bf16 gradients (a GPU's d(att) and d(qkv)): dqkv written, the fp32 path's from zero rounded.
  const Tensor dout16 = rounded(dout);
  Tensor dq3 = Tensor::zeros({B, T, Cq}, DType::kF32),
         dq16 = Tensor::empty({B, T, Cq}, DType::kBF16);
  std::memset(dq16.raw(), 0x7f, dq16.nbytes());
  ops::attention_backward(dq3, widen(dout16), widen(q16), widen(out16), lse1, NH, NKV);
  ops::attention_backward(dq16, dout16, q16, out16, lse2, NH, NKV, 0, true);
  same("attention backward, bf16 gradients", rounded(dq3), dq16);
  cpu::set_bf16_attention_tiles(true);
}

}  // namespace
}  // namespace lmforge
