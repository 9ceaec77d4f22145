// The CUDA kernels (backend/cuda/kernels.h) against their CPU twins (backend/cpu/kernels.h): one
// table of cases, each feeding both backends the same random inputs (shapes that are and are not
// multiples of 4 / 32 / 128, GPT-2's C = 768, rmsnorm's per-head group/stride layout, pointers
// off 16-byte alignment) and comparing every output; gradients start from random values so the
// += of the backwards is checked too. Then the documented extras: run-to-run bit identity of the
// reductions, and NaN for out-of-range ids. Every test skips without a GPU. AdamW's kernels:
// test_cuda_optimizer.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/kernel_checks.h"
#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "testing/cuda.h"

namespace lmforge {
namespace {

using namespace testing;  // DeviceArray; tolerances and checks (cuda/kernel_checks.h)

// ---------------------------------------------------------------------------------------------
// Cases: each runs one kernel (or a forward/backward pair) on both backends.

// packed: explicit positions (each token's position in its document, repeating).
void embedding(Rng& rng, int64_t B, int64_t T, int64_t C, int64_t V, bool with_wpe,
               bool packed = false) {
  const std::vector<int32_t> tokens = rand_ids(rng, B * T, V);
  const std::vector<int32_t> pos = packed ? rand_ids(rng, B * T, T) : std::vector<int32_t>{0};
  const std::vector<float> wte = randn(rng, V * C), wpe = randn(rng, T * C);
  std::vector<float> out = randn(rng, B * T * C);
  DeviceArray<int32_t> d_tokens(tokens), d_pos(pos);
  const int32_t* h_pos = packed ? pos.data() : nullptr;
  const int32_t* g_pos = packed ? d_pos.get() : nullptr;
  DeviceArray<float> d_wte(wte), d_wpe(wpe), d_out(out);
  cpu::embedding_forward<float>(out.data(), tokens.data(), wte.data(),
                                with_wpe ? wpe.data() : nullptr, B, T, C, V, h_pos);
  cuda::embedding_forward(d_out.get(), d_tokens.get(), d_wte.get(),
                          with_wpe ? d_wpe.get() : nullptr, B, T, C, V, g_pos);
  EXPECT_TRUE(close("out", d_out.host(), out, kExact));

  const std::vector<float> dout = randn(rng, B * T * C);
  std::vector<float> dwte = randn(rng, V * C), dwpe = randn(rng, T * C);
  DeviceArray<float> d_dout(dout), d_dwte(dwte), d_dwpe(dwpe);
  cpu::embedding_backward<float>(dwte.data(), with_wpe ? dwpe.data() : nullptr, dout.data(),
                                 tokens.data(), B, T, C, V, h_pos);
  cuda::embedding_backward(d_dwte.get(), with_wpe ? d_dwpe.get() : nullptr, d_dout.get(),
                           d_tokens.get(), B, T, C, V, g_pos, T);
  EXPECT_TRUE(close("dwte", d_dwte.host(), dwte, kExact));
  EXPECT_TRUE(close("dwpe", d_dwpe.host(), dwpe, kExact));
}

// bf16 tables (bf16 master weights): widened exactly on both sides.
void embedding_bf16(Rng& rng, int64_t B, int64_t T, int64_t C, int64_t V, bool with_wpe) {
  const std::vector<int32_t> tokens = rand_ids(rng, B * T, V);
  std::vector<uint16_t> wte(V * C), wpe(T * C);
  for (uint16_t& h : wte) h = fp32_to_bf16(static_cast<float>(rng.normal()));
  for (uint16_t& h : wpe) h = fp32_to_bf16(static_cast<float>(rng.normal()));
  std::vector<float> out = randn(rng, B * T * C);
  DeviceArray<int32_t> d_tokens(tokens);
  DeviceArray<uint16_t> d_wte(wte), d_wpe(wpe);
  DeviceArray<float> d_out(out);
  cpu::embedding_forward(out.data(), tokens.data(), wte.data(), with_wpe ? wpe.data() : nullptr, B,
                         T, C, V);
  cuda::embedding_forward(d_out.get(), d_tokens.get(), d_wte.get(),
                          with_wpe ? d_wpe.get() : nullptr, B, T, C, V);
  EXPECT_TRUE(close("out", d_out.host(), out, kExact));
}

void layernorm(Rng& rng, int64_t N, int64_t C, bool with_bias) {
  const std::vector<float> inp = randn(rng, N * C, 2.0, 3.0), weight = randn(rng, C),
                           bias = randn(rng, C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  DeviceArray<float> d_inp(inp), d_weight(weight), d_bias(bias), d_out(out), d_mean(mean),
      d_rstd(rstd);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(),
                                with_bias ? bias.data() : nullptr, N, C, 1e-5);
  cuda::layernorm_forward(d_out.get(), d_mean.get(), d_rstd.get(), d_inp.get(), d_weight.get(),
                          with_bias ? d_bias.get() : nullptr, N, C, 1e-5);
  EXPECT_TRUE(close("out", d_out.host(), out, kReduction));
  EXPECT_TRUE(close("mean", d_mean.host(), mean, kReduction));
  EXPECT_TRUE(close("rstd", d_rstd.host(), rstd, kReduction));

  // Backward from the CPU's saved statistics on both sides.
  const std::vector<float> dout = randn(rng, N * C);
  std::vector<float> dinp = randn(rng, N * C), dweight = randn(rng, C), dbias = randn(rng, C);
  DeviceArray<float> d_dout(dout), d_dinp(dinp), d_dweight(dweight), d_dbias(dbias), c_mean(mean),
      c_rstd(rstd);
  cpu::layernorm_backward<float>(dinp.data(), dweight.data(), with_bias ? dbias.data() : nullptr,
                                 dout.data(), inp.data(), weight.data(), mean.data(), rstd.data(),
                                 N, C);
  cuda::layernorm_backward(d_dinp.get(), d_dweight.get(), with_bias ? d_dbias.get() : nullptr,
                           d_dout.get(), d_inp.get(), d_weight.get(), c_mean.get(), c_rstd.get(), N,
                           C);
  EXPECT_TRUE(close("dinp", d_dinp.host(), dinp, kReduction));
  EXPECT_TRUE(close("dweight", d_dweight.host(), dweight, kReduction));
  EXPECT_TRUE(close("dbias", d_dbias.host(), dbias, kReduction));
}

// Rows at offset + row_offset(i, C, group, stride) of one array, as the per-head q/k norms read
// a qkv tensor in place; the elements between rows must stay untouched.
// scale_offset: Gemma's 1 + w.
void rmsnorm(Rng& rng, int64_t N, int64_t C, int64_t group, int64_t stride, int64_t offset,
             float scale_offset = 0) {
  const int64_t size = offset + cpu::row_offset(N - 1, C, group, stride) + C;
  const std::vector<float> inp = randn(rng, size, 2.0, 0.5), weight = randn(rng, C);
  std::vector<float> out = randn(rng, size), rstd(N);
  DeviceArray<float> d_inp(inp), d_weight(weight), d_out(out), d_rstd(rstd);
  cpu::rmsnorm_forward<float>(out.data() + offset, rstd.data(), inp.data() + offset, weight.data(),
                              N, C, 1e-6, group, stride, scale_offset);
  cuda::rmsnorm_forward(d_out.get() + offset, d_rstd.get(), d_inp.get() + offset, d_weight.get(), N,
                        C, 1e-6, group, stride, scale_offset);
  EXPECT_TRUE(close("out", d_out.host(), out, kReduction));
  EXPECT_TRUE(close("rstd", d_rstd.host(), rstd, kReduction));

  const std::vector<float> dout = randn(rng, size);
  std::vector<float> dinp = randn(rng, size), dweight = randn(rng, C);
  DeviceArray<float> d_dout(dout), d_dinp(dinp), d_dweight(dweight), c_rstd(rstd);
  cpu::rmsnorm_backward<float>(dinp.data() + offset, dweight.data(), dout.data() + offset,
                               inp.data() + offset, weight.data(), rstd.data(), N, C, group, stride,
                               scale_offset);
  cuda::rmsnorm_backward(d_dinp.get() + offset, d_dweight.get(), d_dout.get() + offset,
                         d_inp.get() + offset, d_weight.get(), c_rstd.get(), N, C, group, stride,
                         scale_offset);
  EXPECT_TRUE(close("dinp", d_dinp.host(), dinp, kReduction));
  EXPECT_TRUE(close("dweight", d_dweight.host(), dweight, kReduction));
}

// Heads at offset + (b T + t) row_stride + h HS, positions pos0 + t of a Llama-style table (or,
// packed, random positions in [0, pos0 + T)).
void rope(Rng& rng, int64_t B, int64_t T, int64_t n_heads, int64_t HS, int64_t row_stride,
          int64_t pos0, int64_t offset, bool packed = false) {
  const int64_t half = HS / 2, T_max = pos0 + T;
  std::vector<float> cos(T_max * half), sin(T_max * half);
  for (int64_t p = 0; p < T_max; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double theta = p * std::pow(10000.0, -2.0 * i / HS);
      cos[p * half + i] = static_cast<float>(std::cos(theta));
      sin[p * half + i] = static_cast<float>(std::sin(theta));
    }
  const int64_t size = offset + B * T * row_stride;
  std::vector<float> x = randn(rng, size), dx = randn(rng, size);
  const std::vector<int32_t> pos = packed ? rand_ids(rng, B * T, T_max) : std::vector<int32_t>{0};
  DeviceArray<int32_t> d_pos(pos);
  const int32_t* h_pos = packed ? pos.data() : nullptr;
  const int32_t* g_pos = packed ? d_pos.get() : nullptr;
  DeviceArray<float> d_cos(cos), d_sin(sin), d_x(x), d_dx(dx);
  cpu::rope_forward<float>(x.data() + offset, cos.data(), sin.data(), B, T, n_heads, HS, row_stride,
                           pos0, h_pos);
  cuda::rope_forward(d_x.get() + offset, d_cos.get(), d_sin.get(), B, T, n_heads, HS, row_stride,
                     pos0, g_pos);
  EXPECT_TRUE(close("x", d_x.host(), x, kExact));
  cpu::rope_backward<float>(dx.data() + offset, cos.data(), sin.data(), B, T, n_heads, HS,
                            row_stride, pos0, h_pos);
  cuda::rope_backward(d_dx.get() + offset, d_cos.get(), d_sin.get(), B, T, n_heads, HS, row_stride,
                      pos0, g_pos);
  EXPECT_TRUE(close("dx", d_dx.host(), dx, kExact));
}

// offset: elements to shift every pointer by (1 leaves 16-byte alignment: the scalar path).
void gelu(Rng& rng, int64_t n, int64_t offset) {
  const std::vector<float> inp = randn(rng, n + offset, 3.0), dout = randn(rng, n + offset);
  std::vector<float> out = randn(rng, n + offset), dinp = randn(rng, n + offset);
  DeviceArray<float> d_inp(inp), d_dout(dout), d_out(out), d_dinp(dinp);
  cpu::gelu_forward<float>(out.data() + offset, inp.data() + offset, n);
  cuda::gelu_forward(d_out.get() + offset, d_inp.get() + offset, n);
  EXPECT_TRUE(close("out", d_out.host(), out, kElementwise));
  cpu::gelu_backward<float>(dinp.data() + offset, inp.data() + offset, dout.data() + offset, n);
  cuda::gelu_backward(d_dinp.get() + offset, d_inp.get() + offset, d_dout.get() + offset, n);
  EXPECT_TRUE(close("dinp", d_dinp.host(), dinp, kElementwise));
}

void glu(Rng& rng, int64_t N, int64_t F, Gate gate) {
  const std::vector<float> inp = randn(rng, N * 2 * F, 3.0), dout = randn(rng, N * F);
  std::vector<float> out(N * F), dinp = randn(rng, N * 2 * F);
  DeviceArray<float> d_inp(inp), d_dout(dout), d_out(out), d_dinp(dinp);
  cpu::glu_forward<float>(out.data(), inp.data(), N, F, gate);
  cuda::glu_forward(d_out.get(), d_inp.get(), N, F, gate);
  EXPECT_TRUE(close("out", d_out.host(), out, kElementwise));
  cpu::glu_backward<float>(dinp.data(), inp.data(), dout.data(), N, F, gate);
  cuda::glu_backward(d_dinp.get(), d_inp.get(), d_dout.get(), N, F, gate);
  EXPECT_TRUE(close("dinp", d_dinp.host(), dinp, kElementwise));
}

// Every fifth row ignored; backward both out of place and in place (dlogits aliasing logits).
void softmax_xent(Rng& rng, int64_t N, int64_t V, double z_loss) {
  constexpr int32_t kIgnore = -100;
  const std::vector<float> logits = randn(rng, N * V, 4.0);
  std::vector<int32_t> targets = rand_ids(rng, N, V);
  for (int64_t i = 0; i < N; i += 5) targets[i] = kIgnore;
  std::vector<float> losses(N);
  double lse_sq = 0;
  DeviceArray<float> d_logits(logits), d_losses(losses);
  DeviceArray<int32_t> d_targets(targets);
  DeviceArray<double> d_lse_sq(std::vector<double>{-1.0});
  cpu::softmax_xent_forward<float>(losses.data(), logits.data(), targets.data(), N, V, kIgnore,
                                   &lse_sq);
  cuda::softmax_xent_forward(d_losses.get(), d_logits.get(), d_targets.get(), N, V, kIgnore,
                             d_lse_sq.get());
  EXPECT_TRUE(close("losses", d_losses.host(), losses, kReduction));
  EXPECT_TRUE(close("lse_sq_sum", {static_cast<float>(device_scalar(d_lse_sq.get()))},
                    {static_cast<float>(lse_sq)}, kReduction));

  const float dloss = 1.0f / static_cast<float>(N);
  std::vector<float> dlogits(N * V);
  DeviceArray<float> d_dlogits(dlogits);
  cpu::softmax_xent_backward<float>(dlogits.data(), logits.data(), targets.data(), dloss, N, V,
                                    kIgnore, z_loss);
  cuda::softmax_xent_backward(d_dlogits.get(), d_logits.get(), d_targets.get(), dloss, N, V,
                              kIgnore, z_loss);
  EXPECT_TRUE(close("dlogits", d_dlogits.host(), dlogits, kReduction));
  // Written in bf16 into rows padded to 8 elements: each row the rounding of the fp32 kernel's,
  // the padding untouched.
  const int64_t ld = (V + 7) / 8 * 8;
  DeviceArray<uint16_t> d16(std::vector<uint16_t>(N * ld, 0xabab)), want(N * ld);
  cuda::softmax_xent_backward(d16.get(), ld, d_logits.get(), d_targets.get(), dloss, N, V, kIgnore,
                              z_loss);
  cuda::detail::to_bf16_rows(want.get(), ld, d_dlogits.get(), N, V);
  const std::vector<uint16_t> got = d16.host(), ref = want.host();
  for (int64_t i = 0; i < N; ++i) {
    ASSERT_EQ(std::memcmp(got.data() + i * ld, ref.data() + i * ld, V * 2), 0) << "row " << i;
    for (int64_t v = V; v < ld; ++v) ASSERT_EQ(got[i * ld + v], 0xabab) << "row " << i;
  }
  // The fused forward + backward: the separate kernels' losses and dlogits bit for bit (fp32 and
  // padded bf16), lse^2 to rounding.
  DeviceArray<float> f_losses(losses), f_dlogits(dlogits);
  DeviceArray<double> f_lse_sq(std::vector<double>{-1.0});
  cuda::softmax_xent_forward_backward(f_losses.get(), f_lse_sq.get(), f_dlogits.get(),
                                      d_logits.get(), d_targets.get(), dloss, N, V, kIgnore,
                                      z_loss);
  EXPECT_EQ(f_losses.host(), d_losses.host());
  EXPECT_EQ(f_dlogits.host(), d_dlogits.host());
  EXPECT_NEAR(device_scalar(f_lse_sq.get()), device_scalar(d_lse_sq.get()),
              1e-12 * std::abs(device_scalar(d_lse_sq.get())));
  DeviceArray<uint16_t> f16(std::vector<uint16_t>(N * ld, 0xabab));
  cuda::softmax_xent_forward_backward(f_losses.get(), f_lse_sq.get(), f16.get(), ld, d_logits.get(),
                                      d_targets.get(), dloss, N, V, kIgnore, z_loss);
  EXPECT_EQ(f16.host(), d16.host());
  // The same from logits whose rows are padded to 16 bytes (the LM head's chunk on a GPU); the
  // padding (NaN here) is never read.
  const int64_t ldx = (V + 3) / 4 * 4;
  std::vector<float> padded(N * ldx, std::numeric_limits<float>::quiet_NaN());
  for (int64_t i = 0; i < N; ++i)
    std::copy(logits.begin() + i * V, logits.begin() + (i + 1) * V, padded.begin() + i * ldx);
  DeviceArray<float> d_padded(padded), p_losses(losses);
  DeviceArray<double> p_lse_sq(std::vector<double>{-1.0});
  DeviceArray<uint16_t> p16(std::vector<uint16_t>(N * ld, 0xabab));
  cuda::softmax_xent_forward_backward(p_losses.get(), p_lse_sq.get(), p16.get(), ld, d_padded.get(),
                                      d_targets.get(), dloss, N, V, kIgnore, z_loss, ldx);
  // Aligned rows split the row sums differently (vector body vs head/tail): to rounding.
  EXPECT_TRUE(close("losses (padded rows)", p_losses.host(), losses, kReduction));
  EXPECT_NEAR(device_scalar(p_lse_sq.get()), lse_sq, kReduction * std::abs(lse_sq));
  DeviceArray<float> e_losses(losses);  // the forward alone (evaluation) on the padded rows
  cuda::softmax_xent_forward(e_losses.get(), d_padded.get(), d_targets.get(), N, V, kIgnore,
                             p_lse_sq.get(), ldx);
  EXPECT_TRUE(close("losses (forward, padded rows)", e_losses.host(), losses, kReduction));
  EXPECT_NEAR(device_scalar(p_lse_sq.get()), lse_sq, kReduction * std::abs(lse_sq));
  const std::vector<uint16_t> got16 = p16.host();
  expect_bf16_rows_near(got16, dlogits, N, V, ld);
  cuda::softmax_xent_backward(d_logits.get(), d_logits.get(), d_targets.get(), dloss, N, V, kIgnore,
                              z_loss);
  EXPECT_TRUE(close("dlogits in place", d_logits.host(), dlogits, kReduction));
}

// Per-sequence objectives: the fused cross-entropy with per-row gradient weights (DPO, ORPO), and
// knowledge distillation's fused cross-entropy + KL (fp32 and padded bf16 dlogits) against the
// CPU.
void xent_objectives(Rng& rng, int64_t N, int64_t V) {
  constexpr int32_t kIgnore = -100;
  const std::vector<float> logits = randn(rng, N * V, 3.0), teacher = randn(rng, N * V, 4.0);
  std::vector<int32_t> targets = rand_ids(rng, N, V);
  for (int64_t i = 0; i < N; i += 4) targets[i] = kIgnore;
  std::vector<float> scale(N);
  for (int64_t i = 0; i < N; ++i) scale[i] = static_cast<float>(rng.normal());
  const float dloss = 0.5f;
  std::vector<float> losses(N), dlogits(N * V);
  double lse_sq = 0;
  cpu::softmax_xent_forward_backward<float>(losses.data(), dlogits.data(), logits.data(),
                                            targets.data(), dloss, N, V, kIgnore, 0.0, &lse_sq,
                                            scale.data());
  DeviceArray<float> d_logits(logits), d_teacher(teacher), d_scale(scale), d_losses(losses),
      d_dlogits(dlogits), d_kl(losses);
  DeviceArray<int32_t> d_targets(targets);
  DeviceArray<double> d_lse_sq(std::vector<double>{-1.0});
  cuda::softmax_xent_forward_backward(d_losses.get(), d_lse_sq.get(), d_dlogits.get(),
                                      d_logits.get(), d_targets.get(), dloss, N, V, kIgnore, 0.0,
                                      d_scale.get());
  EXPECT_TRUE(close("weighted xent losses", d_losses.host(), losses, kReduction));
  EXPECT_TRUE(close("weighted xent dlogits", d_dlogits.host(), dlogits, kReduction));

  const double alpha = 0.7, temperature = 2.0;
  std::vector<float> kl(N);
  cpu::softmax_distill_forward_backward(losses.data(), kl.data(), dlogits.data(), logits.data(),
                                        teacher.data(), targets.data(), dloss, N, V, kIgnore, alpha,
                                        temperature);
  cuda::softmax_distill_forward_backward(d_losses.get(), d_kl.get(), d_dlogits.get(), nullptr, V,
                                         d_logits.get(), V, d_teacher.get(), V, d_targets.get(),
                                         dloss, N, V, kIgnore, alpha, temperature);
  EXPECT_TRUE(close("distill losses", d_losses.host(), losses, kReduction));
  EXPECT_TRUE(close("distill kl", d_kl.host(), kl, kReduction));
  EXPECT_TRUE(close("distill dlogits", d_dlogits.host(), dlogits, kReduction));
  const int64_t ld = (V + 7) / 8 * 8;
  DeviceArray<uint16_t> d16(std::vector<uint16_t>(N * ld, 0xabab));
  cuda::softmax_distill_forward_backward(d_losses.get(), d_kl.get(), nullptr, d16.get(), ld,
                                         d_logits.get(), V, d_teacher.get(), V, d_targets.get(),
                                         dloss, N, V, kIgnore, alpha, temperature);
  const std::vector<uint16_t> got16 = d16.host();
  expect_bf16_rows_near(got16, dlogits, N, V, ld);
}

// dst += src on cols columns from col0 of rows ld apart (qk_norm's v pass-through); the other
// columns untouched.
void accumulate_rows(Rng& rng, int64_t rows, int64_t cols, int64_t ld, int64_t col0) {
  const std::vector<float> src = randn(rng, rows * ld);
  std::vector<float> dst = randn(rng, rows * ld);
  DeviceArray<float> d_src(src), d_dst(dst);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = col0; c < col0 + cols; ++c) dst[r * ld + c] += src[r * ld + c];
  cuda::accumulate_rows(d_dst.get() + col0, d_src.get() + col0, rows, cols, ld);
  EXPECT_TRUE(close("accumulate_rows", d_dst.host(), dst, kExact));
}

void elementwise(Rng& rng, int64_t n, int64_t offset) {
  const std::vector<float> a = randn(rng, n + offset), b = randn(rng, n + offset);
  std::vector<float> out = randn(rng, n + offset), acc = randn(rng, n + offset);
  DeviceArray<float> d_a(a), d_b(b), d_out(out), d_acc(acc);
  const int64_t o = offset;
  cpu::add<float>(out.data() + o, a.data() + o, b.data() + o, n);
  cuda::add(d_out.get() + o, d_a.get() + o, d_b.get() + o, n);
  EXPECT_TRUE(close("add", d_out.host(), out, kExact));
  cpu::accumulate<float>(acc.data() + o, a.data() + o, n);
  cuda::accumulate(d_acc.get() + o, d_a.get() + o, n);
  EXPECT_TRUE(close("accumulate", d_acc.host(), acc, kExact));
  cpu::scale<float>(acc.data() + o, 0.37f, n);
  cuda::scale(d_acc.get() + o, 0.37f, n);
  EXPECT_TRUE(close("scale", d_acc.host(), acc, kExact));
  // (the CPU's compiler may fuse a y + b x into one FMA: a rounding apart)
  cpu::axpby<float>(acc.data() + o, 0.95f, b.data() + o, -0.05f, n);
  cuda::axpby(d_acc.get() + o, 0.95f, d_b.get() + o, -0.05f, n);
  EXPECT_TRUE(close("axpby", d_acc.host(), acc, kElementwise));
  std::fill(acc.begin() + o, acc.begin() + o + n, -2.5f);
  cuda::fill(d_acc.get() + o, -2.5f, n);
  EXPECT_TRUE(close("fill", d_acc.host(), acc, kExact));
  std::fill(acc.begin() + o, acc.begin() + o + n, 0.0f);
  cuda::zero(d_acc.get() + o, n);
  EXPECT_TRUE(close("zero", d_acc.host(), acc, kExact));
}

void sum_squares(Rng& rng, int64_t n, int64_t offset) {
  const std::vector<float> x = randn(rng, n + offset, 3.0);
  DeviceArray<float> d_x(x);
  DeviceArray<double> d_sum(std::vector<double>{123.0});
  const double want = cpu::sum_squares<float>(x.data() + offset, n);
  cuda::sum_squares(d_sum.get(), d_x.get() + offset, n);
  const double got = device_scalar(d_sum.get());
  EXPECT_LE(std::fabs(got - want), kDoubleSum * std::fabs(want)) << got << " vs " << want;
  cuda::sum_squares(d_sum.get(), d_x.get() + offset, n, /*accumulate=*/true);
  EXPECT_LE(std::fabs(device_scalar(d_sum.get()) - 2 * want), kDoubleSum * std::fabs(2 * want));
}

// cuda::sum against a double sum on the host (the loss read-back of a step).
void sum(Rng& rng, int64_t n, int64_t offset) {
  const std::vector<float> x = randn(rng, n + offset, 3.0);
  DeviceArray<float> d_x(x);
  DeviceArray<double> d_sum(std::vector<double>{123.0});
  double want = 0, scale = 0;
  for (int64_t i = offset; i < offset + n; ++i) want += x[i], scale += std::fabs(x[i]);
  cuda::sum(d_sum.get(), d_x.get() + offset, n);
  const double got = device_scalar(d_sum.get());
  EXPECT_LE(std::fabs(got - want), kDoubleSum * scale) << got << " vs " << want;
  cuda::sum(d_sum.get(), d_x.get() + offset, n, /*accumulate=*/true);
  EXPECT_LE(std::fabs(device_scalar(d_sum.get()) - 2 * want), 2 * kDoubleSum * scale);
}

// bf16 activations: each forward writing bf16 gives exactly to_bf16 of its own fp32 output.
void bf16_outputs(Rng& rng, int64_t N, int64_t C) {
  const std::vector<float> inp = randn(rng, N * 2 * C, 2.0, 0.5), weight = randn(rng, C),
                           bias = randn(rng, C);
  DeviceArray<float> d_inp(inp), d_weight(weight), d_bias(bias), d_out(std::vector<float>(N * C)),
      d_stat(std::vector<float>(2 * N));
  DeviceArray<uint16_t> d_want(std::vector<uint16_t>(N * C)), d_got(std::vector<uint16_t>(N * C));
  float* mean = d_stat.get();
  float* rstd = d_stat.get() + N;
  auto check = [&](const char* what) {
    cuda::to_bf16(d_want.get(), d_out.get(), N * C);
    EXPECT_TRUE(same_bits(what, d_got.host(), d_want.host()));
  };
  cuda::layernorm_forward(d_out.get(), mean, rstd, d_inp.get(), d_weight.get(), d_bias.get(), N, C,
                          1e-5);
  cuda::layernorm_forward(d_got.get(), mean, rstd, d_inp.get(), d_weight.get(), d_bias.get(), N, C,
                          1e-5);
  check("layernorm");
  cuda::rmsnorm_forward(d_out.get(), rstd, d_inp.get(), d_weight.get(), N, C, 1e-6, 1, C);
  cuda::rmsnorm_forward(d_got.get(), rstd, d_inp.get(), d_weight.get(), N, C, 1e-6, 1, C);
  check("rmsnorm");
  cuda::gelu_forward(d_out.get(), d_inp.get(), N * C);
  cuda::gelu_forward(d_got.get(), d_inp.get(), N * C);
  check("gelu");
  for (Gate gate : {Gate::kSilu, Gate::kGelu}) {
    cuda::glu_forward(d_out.get(), d_inp.get(), N, C, gate);
    cuda::glu_forward(d_got.get(), d_inp.get(), N, C, gate);
    check(gate == Gate::kSilu ? "swiglu" : "geglu");
  }
}

// bf16 matmul outputs (bf16 activations throughout): the activations on a bf16 input give their
// fp32 kernel's output on the widened input, rounded (backwards: written, not added, so d_got
// starts as garbage); RoPE on a bf16 qkv and the residual add of a bf16 branch are bit-identical
// to the CPU; the bias gradient of a bf16 dout (rows ld apart) matches the CPU's column sums; the
// matmul's bf16 output is its fp32 output rounded (within one bf16 ulp: cuBLASLt may pick another
// algorithm for a bf16 D), bias included.
void bf16_matmul_outputs(Rng& rng, int64_t N, int64_t F) {
  auto to16 = [](const std::vector<float>& v) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = fp32_to_bf16_ftz(v[i]);
    return h;
  };
  auto widen = [](const std::vector<uint16_t>& h) {
    std::vector<float> v(h.size());
    for (size_t i = 0; i < h.size(); ++i) v[i] = bf16_to_fp32(h[i]);
    return v;
  };
  const std::vector<uint16_t> a16 = to16(randn(rng, N * 2 * F, 2.0, 0.5));
  const std::vector<float> a32 = widen(a16), dout = randn(rng, N * F);
  DeviceArray<uint16_t> d_a16(a16), d_got(std::vector<uint16_t>(N * 2 * F, 0x7f7f)),
      d_want(std::vector<uint16_t>(N * 2 * F));
  DeviceArray<float> d_a32(a32), d_dout(dout), d_f32(zeros(N * 2 * F));
  auto check = [&](const char* what, int64_t n) {
    cuda::to_bf16(d_want.get(), d_f32.get(), n);
    std::vector<uint16_t> got = d_got.host(), want = d_want.host();
    got.resize(n);
    want.resize(n);
    EXPECT_TRUE(same_bits(what, got, want));
  };
  cuda::gelu_forward(d_f32.get(), d_a32.get(), N * F);
  cuda::gelu_forward(d_got.get(), d_a16.get(), N * F);
  check("gelu", N * F);
  cuda::zero(d_f32.get(), N * 2 * F);
  cuda::gelu_backward(d_f32.get(), d_a32.get(), d_dout.get(), N * F);
  cuda::gelu_backward(d_got.get(), d_a16.get(), d_dout.get(), N * F);
  check("gelu_backward", N * F);
  for (Gate gate : {Gate::kSilu, Gate::kGelu}) {
    const std::string name = gate == Gate::kSilu ? "swiglu" : "geglu";
    cuda::glu_forward(d_f32.get(), d_a32.get(), N, F, gate);
    cuda::glu_forward(d_got.get(), d_a16.get(), N, F, gate);
    check(name.c_str(), N * F);
    cuda::zero(d_f32.get(), N * 2 * F);
    cuda::glu_backward(d_f32.get(), d_a32.get(), d_dout.get(), N, F, gate);
    cuda::glu_backward(d_got.get(), d_a16.get(), d_dout.get(), N, F, gate);
    check((name + "_backward").c_str(), N * 2 * F);
  }

  // The residual add, against the CPU.
  std::vector<float> sum(N * F);
  cpu::add(sum.data(), dout.data(), a16.data(), N * F);
  cuda::add(d_f32.get(), d_dout.get(), d_a16.get(), N * F);
  std::vector<float> got_sum = d_f32.host();
  got_sum.resize(N * F);
  EXPECT_TRUE(close("add", got_sum, sum, kExact));

  // RoPE on a bf16 qkv (rows of 2F = (NH + 2 NKV) * HS with NH = 2, NKV = 1: HS = F / 2), as the
  // CPU path of ops does it: widen, rotate the q and k heads, round them.
  if (F % 4 == 0) {
    const int64_t HS = F / 2, half = HS / 2, T = N, Tm = T + 3, Cq = 2 * F;
    std::vector<float> cs(Tm * half), sn(Tm * half);
    for (int64_t i = 0; i < Tm * half; ++i) {
      cs[i] = static_cast<float>(std::cos(0.01 * i));
      sn[i] = static_cast<float>(std::sin(0.01 * i));
    }
    std::vector<float> x = a32;
    cpu::rope_forward<float>(x.data(), cs.data(), sn.data(), 1, T, 3, HS, Cq, 3);
    std::vector<uint16_t> want = a16;
    for (int64_t r = 0; r < T; ++r)
      for (int64_t c = 0; c < 3 * HS; ++c) want[r * Cq + c] = fp32_to_bf16_ftz(x[r * Cq + c]);
    DeviceArray<uint16_t> d_x(a16);
    DeviceArray<float> d_cos(cs), d_sin(sn);
    cuda::rope_forward(d_x.get(), d_cos.get(), d_sin.get(), 1, T, 3, HS, Cq, 3);
    EXPECT_TRUE(same_bits("rope", d_x.host(), want));
    std::vector<float> dx = a32;  // the backward on a bf16 dqkv likewise
    cpu::rope_backward<float>(dx.data(), cs.data(), sn.data(), 1, T, 3, HS, Cq, 3);
    std::vector<uint16_t> want_b = a16;
    for (int64_t r = 0; r < T; ++r)
      for (int64_t c = 0; c < 3 * HS; ++c) want_b[r * Cq + c] = fp32_to_bf16_ftz(dx[r * Cq + c]);
    DeviceArray<uint16_t> d_dx(a16);
    cuda::rope_backward(d_dx.get(), d_cos.get(), d_sin.get(), 1, T, 3, HS, Cq, 3);
    EXPECT_TRUE(same_bits("rope backward", d_dx.host(), want_b));
  }

  // The bias gradient of a bf16 dout with rows ld apart, and the matmul's bf16 output.
  const int64_t OC = F, C = 2 * F, ld = OC + 8;
  std::vector<uint16_t> g16 = to16(randn(rng, N * ld));
  std::vector<float> db = randn(rng, OC), bias = randn(rng, OC);
  DeviceArray<uint16_t> d_g16(g16);
  DeviceArray<float> d_db(db), d_bias(bias);
  cpu::bias_grad<float, uint16_t>(db.data(), g16.data(), N, OC, ld);
  cuda::bias_grad(d_db.get(), d_g16.get(), N, OC, ld);
  EXPECT_TRUE(close("bias_grad bf16", d_db.host(), db, kReduction));
  const std::vector<uint16_t> w16 = to16(randn(rng, OC * C, 0.1));
  DeviceArray<uint16_t> d_w16(w16), d_y16(std::vector<uint16_t>(N * OC));
  DeviceArray<float> d_y32(zeros(N * OC));
  for (const float* b :
       {static_cast<const float*>(d_bias.get()), static_cast<const float*>(nullptr)}) {
    cuda::linear_forward_bf16(d_y32.get(), d_a16.get(), d_w16.get(), b, N, C, OC);
    cuda::linear_forward_bf16(d_y16.get(), d_a16.get(), d_w16.get(), b, N, C, OC);
    const std::vector<float> y32 = d_y32.host();
    const std::vector<uint16_t> y16 = d_y16.host();
    // Within one bf16 ulp of the fp32 result (plus fp32 summation noise near zero); the bf16
    // output's epilogue adds the bias rounded to bf16 (as autocast does): half its ulp more.
    for (int64_t i = 0; i < N * OC; ++i)
      ASSERT_LE(std::fabs(bf16_to_fp32(y16[i]) - y32[i]),
                std::ldexp(1.0, std::ilogb(y32[i]) - 7) + 1e-5 +
                    (b ? std::ldexp(1.0, std::ilogb(bias[i % OC]) - 8) : 0.0))
          << i << (b ? " with" : " without") << " bias";
  }
  // The backward writing a bf16 dinp: the fp32 dinp from zero, rounded (within an ulp).
  const std::vector<float> gout = randn(rng, N * OC);
  DeviceArray<float> d_gout(gout), d_dx32(zeros(N * C)), d_dw(zeros(OC * C));
  DeviceArray<uint16_t> d_dx16(std::vector<uint16_t>(N * C, 0x7f7f));
  cuda::linear_backward_bf16(d_dx32.get(), d_dw.get(), nullptr, d_gout.get(), d_a16.get(),
                             d_w16.get(), N, C, OC);
  cuda::linear_backward_bf16(d_dx16.get(), nullptr, nullptr, d_gout.get(), d_a16.get(), d_w16.get(),
                             N, C, OC);
  const std::vector<float> dx32 = d_dx32.host();
  const std::vector<uint16_t> dx16 = d_dx16.host();
  for (int64_t i = 0; i < N * C; ++i)
    ASSERT_LE(std::fabs(bf16_to_fp32(dx16[i]) - dx32[i]),
              std::ldexp(1.0, std::ilogb(dx32[i]) - 7) + 1e-5)
        << i;
}

std::vector<KernelCase> cases() {
  return {
      {"embedding_B2_T7_C37_V11", [](Rng& r) { embedding(r, 2, 7, 37, 11, true); }},
      {"embedding_B4_T64_C768_V1000", [](Rng& r) { embedding(r, 4, 64, 768, 1000, true); }},
      {"embedding_nopos_B3_T300_C130_V50", [](Rng& r) { embedding(r, 3, 300, 130, 50, false); }},
      {"embedding_repeats_B8_T256_C64_V5", [](Rng& r) { embedding(r, 8, 256, 64, 5, true); }},
      {"embedding_packed_B4_T64_C768_V1000",
       [](Rng& r) { embedding(r, 4, 64, 768, 1000, true, /*packed=*/true); }},
      // Runs of one token (summed in a register, written once), across 1024-token chunks.
      {"embedding_runs_B2_T1500_C64_V1", [](Rng& r) { embedding(r, 2, 1500, 64, 1, true); }},
      {"embedding_runs_B3_T700_C200_V2", [](Rng& r) { embedding(r, 3, 700, 200, 2, false); }},
      {"layernorm_N1_C1", [](Rng& r) { layernorm(r, 1, 1, true); }},
      {"layernorm_N5_C37", [](Rng& r) { layernorm(r, 5, 37, true); }},
      {"layernorm_N33_C768", [](Rng& r) { layernorm(r, 33, 768, true); }},
      {"layernorm_nobias_N7_C1000", [](Rng& r) { layernorm(r, 7, 1000, false); }},
      {"layernorm_N9_C130", [](Rng& r) { layernorm(r, 9, 130, true); }},
      {"layernorm_N2051_C64", [](Rng& r) { layernorm(r, 2051, 64, true); }},
      {"layernorm_N600_C768", [](Rng& r) { layernorm(r, 600, 768, true); }},
      {"rmsnorm_N17_C768", [](Rng& r) { rmsnorm(r, 17, 768, 1, 768, 0); }},
      {"rmsnorm_N5_C37", [](Rng& r) { rmsnorm(r, 5, 37, 1, 37, 0); }},
      {"rmsnorm_plus_one_N17_C640", [](Rng& r) { rmsnorm(r, 17, 640, 1, 640, 0, 1.0f); }},
      {"rmsnorm_plus_one_qnorm_N24_C64_group4",
       [](Rng& r) { rmsnorm(r, 24, 64, 4, 512, 0, 1.0f); }},
      {"rmsnorm_N3000_C128", [](Rng& r) { rmsnorm(r, 3000, 128, 1, 128, 0); }},
      // Qwen3's q/k norms on a qkv row of (4 q + 2 k + 2 v) heads of 64: q heads, then k heads.
      {"rmsnorm_qnorm_N24_C64_group4", [](Rng& r) { rmsnorm(r, 24, 64, 4, 512, 0); }},
      {"rmsnorm_knorm_N12_C64_group2", [](Rng& r) { rmsnorm(r, 12, 64, 2, 512, 256); }},
      {"rmsnorm_misaligned_N10_C6_group2", [](Rng& r) { rmsnorm(r, 10, 6, 2, 30, 3); }},
      {"rope_B2_T5_H3_HS64", [](Rng& r) { rope(r, 2, 5, 3, 64, 5 * 64, 3, 0); }},
      {"rope_B1_T7_H2_HS6", [](Rng& r) { rope(r, 1, 7, 2, 6, 12, 0, 0); }},
      {"rope_kheads_B2_T5_H2_HS64", [](Rng& r) { rope(r, 2, 5, 2, 64, 8 * 64, 1, 4 * 64); }},
      {"rope_B2_T16_H4_HS128", [](Rng& r) { rope(r, 2, 16, 4, 128, 6 * 128, 0, 0); }},
      {"rope_packed_B2_T16_H4_HS128",
       [](Rng& r) { rope(r, 2, 16, 4, 128, 6 * 128, 0, 0, /*packed=*/true); }},
      // Odd head size (half = 4 would take the float4 path but head h starts at h * 9).
      {"rope_odd_B2_T3_H3_HS9", [](Rng& r) { rope(r, 2, 3, 3, 9, 28, 1, 0); }},
      {"gelu_n1", [](Rng& r) { gelu(r, 1, 0); }},
      {"gelu_n12345", [](Rng& r) { gelu(r, 12345, 0); }},
      {"gelu_n21504", [](Rng& r) { gelu(r, 768 * 4 * 7, 0); }},
      {"gelu_misaligned_n1000", [](Rng& r) { gelu(r, 1000, 1); }},
      {"swiglu_N3_F37", [](Rng& r) { glu(r, 3, 37, Gate::kSilu); }},
      {"swiglu_N5_F128", [](Rng& r) { glu(r, 5, 128, Gate::kSilu); }},
      {"swiglu_N8_F3072", [](Rng& r) { glu(r, 8, 3072, Gate::kSilu); }},
      {"geglu_N3_F37", [](Rng& r) { glu(r, 3, 37, Gate::kGelu); }},
      {"geglu_N8_F3072", [](Rng& r) { glu(r, 8, 3072, Gate::kGelu); }},
      {"softmax_xent_N7_V50257", [](Rng& r) { softmax_xent(r, 7, 50257, 0.0); }},
      {"softmax_xent_zloss_N16_V50304", [](Rng& r) { softmax_xent(r, 16, 50304, 1e-4); }},
      {"softmax_xent_N33_V100", [](Rng& r) { softmax_xent(r, 33, 100, 0.0); }},
      {"softmax_xent_zloss_N4_V3", [](Rng& r) { softmax_xent(r, 4, 3, 0.5); }},
      {"softmax_xent_N6_V1", [](Rng& r) { softmax_xent(r, 6, 1, 0.0); }},
      {"xent_objectives_N9_V50257", [](Rng& r) { xent_objectives(r, 9, 50257); }},
      {"xent_objectives_N5_V7", [](Rng& r) { xent_objectives(r, 5, 7); }},
      {"accumulate_rows_R37_C64_ld192", [](Rng& r) { accumulate_rows(r, 37, 64, 192, 128); }},
      {"accumulate_rows_R5_C6_ld21", [](Rng& r) { accumulate_rows(r, 5, 6, 21, 9); }},
      {"elementwise_n1", [](Rng& r) { elementwise(r, 1, 0); }},
      {"elementwise_n7", [](Rng& r) { elementwise(r, 7, 0); }},
      {"elementwise_n100003", [](Rng& r) { elementwise(r, 100003, 0); }},
      {"elementwise_misaligned_n1000", [](Rng& r) { elementwise(r, 1000, 1); }},
      {"sum_squares_n1", [](Rng& r) { sum_squares(r, 1, 0); }},
      {"sum_squares_n1000", [](Rng& r) { sum_squares(r, 1000, 0); }},
      {"sum_squares_n1048579", [](Rng& r) { sum_squares(r, (1 << 20) + 3, 0); }},
      {"sum_squares_misaligned_n5000001", [](Rng& r) { sum_squares(r, 5000001, 3); }},
      {"sum_n1000", [](Rng& r) { sum(r, 1000, 0); }},
      {"sum_misaligned_n5000001", [](Rng& r) { sum(r, 5000001, 3); }},
      {"bf16_outputs_N33_C768", [](Rng& r) { bf16_outputs(r, 33, 768); }},
      {"bf16_outputs_N7_C37", [](Rng& r) { bf16_outputs(r, 7, 37); }},
      {"bf16_matmul_outputs_N64_F768", [](Rng& r) { bf16_matmul_outputs(r, 64, 768); }},
      {"bf16_matmul_outputs_N9_F36", [](Rng& r) { bf16_matmul_outputs(r, 9, 36); }},
      {"bf16_matmul_outputs_N5_F13", [](Rng& r) { bf16_matmul_outputs(r, 5, 13); }},
      {"embedding_bf16_B4_T64_C768_V1000",
       [](Rng& r) { embedding_bf16(r, 4, 64, 768, 1000, true); }},
      {"embedding_bf16_nopos_B3_T30_C130_V50",
       [](Rng& r) { embedding_bf16(r, 3, 30, 130, 50, false); }},
  };
}

class CudaKernels : public ::testing::TestWithParam<KernelCase> {};

TEST_P(CudaKernels, MatchesCpu) { run_kernel_case(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Kernels, CudaKernels, ::testing::ValuesIn(cases()), kernel_case_name);

// The reductions give the same bits on every run (no atomics, partitions fixed by the shapes).
TEST(CudaKernelsDeterminism, ReductionsAreBitIdenticalAcrossRuns) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  Rng rng(7);
  const int64_t B = 16, T = 512, C = 768, V = 3, N = B * T, NX = 64, VX = 1000;
  const std::vector<int32_t> tokens = rand_ids(rng, N, V);  // each id thousands of times
  const std::vector<int32_t> targets = rand_ids(rng, NX, VX);
  const std::vector<float> act = randn(rng, N * C, 1.0, 1.0), grad = randn(rng, N * C),
                           weight = randn(rng, C), stats(N, 1.0f);
  DeviceArray<int32_t> d_tokens(tokens), d_targets(targets);
  DeviceArray<float> d_act(act), d_grad(grad), d_weight(weight), d_mean(stats), d_rstd(stats);

  struct Outputs {
    std::vector<float> dwte, dwpe, ln_dw, ln_db, rms_dw;
    std::vector<double> sums;  // sum_squares, lse_sq_sum
  };
  auto run = [&] {
    Outputs o;
    DeviceArray<float> dwte(zeros(V * C)), dwpe(zeros(T * C));
    cuda::embedding_backward(dwte.get(), dwpe.get(), d_grad.get(), d_tokens.get(), B, T, C, V,
                             nullptr, 0);
    o.dwte = dwte.host();
    o.dwpe = dwpe.host();
    DeviceArray<float> dinp(zeros(N * C)), dw(zeros(C)), db(zeros(C)), rms_dw(zeros(C));
    cuda::layernorm_backward(dinp.get(), dw.get(), db.get(), d_grad.get(), d_act.get(),
                             d_weight.get(), d_mean.get(), d_rstd.get(), N, C);
    o.ln_dw = dw.host();
    o.ln_db = db.host();
    cuda::rmsnorm_backward(dinp.get(), rms_dw.get(), d_grad.get(), d_act.get(), d_weight.get(),
                           d_rstd.get(), N, C, 1, C);
    o.rms_dw = rms_dw.host();
    DeviceArray<double> sums(zeros<double>(2));
    DeviceArray<float> losses(zeros(NX));
    cuda::sum_squares(sums.get(), d_act.get(), N * C);
    cuda::softmax_xent_forward(losses.get(), d_act.get(), d_targets.get(), NX, VX, -100,
                               sums.get() + 1);
    o.sums = sums.host();
    return o;
  };
  const Outputs first = run(), second = run();
  EXPECT_TRUE(bit_identical(first.dwte, second.dwte));
  EXPECT_TRUE(bit_identical(first.dwpe, second.dwpe));
  EXPECT_TRUE(bit_identical(first.ln_dw, second.ln_dw));
  EXPECT_TRUE(bit_identical(first.ln_db, second.ln_db));
  EXPECT_TRUE(bit_identical(first.rms_dw, second.rms_dw));
  EXPECT_TRUE(bit_identical(first.sums, second.sums));
}

// A kernel cannot raise: out-of-range ids show up as NaN (kernels.h).
TEST(CudaKernelsInvalidIds, GiveNaN) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t C = 8, V = 4;
  DeviceArray<int32_t> tokens({1, 4, -1});
  DeviceArray<float> wte(std::vector<float>(V * C, 1.0f)), out(zeros(3 * C));
  cuda::embedding_forward(out.get(), tokens.get(), wte.get(), nullptr, 1, 3, C, V);
  const std::vector<float> o = out.host();
  EXPECT_EQ(o[0], 1.0f);
  EXPECT_TRUE(std::isnan(o[C])) << "token == V";
  EXPECT_TRUE(std::isnan(o[2 * C])) << "token < 0";

  DeviceArray<int32_t> targets({0, 7, -100});
  DeviceArray<float> logits(std::vector<float>(3 * V, 0.5f)), losses(zeros(3));
  cuda::softmax_xent_forward(losses.get(), logits.get(), targets.get(), 3, V, -100, nullptr);
  const std::vector<float> l = losses.host();
  EXPECT_NEAR(l[0], std::log(4.0), 1e-6);
  EXPECT_TRUE(std::isnan(l[1])) << "target == 7 with V == 4";
  EXPECT_EQ(l[2], 0.0f) << "ignored";
}

}  // namespace
}  // namespace lmforge
