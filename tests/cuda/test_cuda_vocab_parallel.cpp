// Vocabulary parallelism's ops on the GPU (backend/cuda: the embedding with a vocabulary offset,
// softmax_xent_stats and softmax_xent_parallel, distillation's softmax_distill_stats and
// softmax_distill_parallel) against the same ops on the CPU, which
// test_vocab_parallel checks against the whole vocabulary's. Three ranks' parts of one
// vocabulary, fp32 and bf16 gradients, the z-loss with per-row scales, and a GPU chunk's padded
// logits rows. Every test skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/backend/distill_stats.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "testing/random.h"

namespace lmforge {
namespace {

using testing::random_normal;
Tensor gpu(const Tensor& t) { return t.to(Device::kCUDA); }
Tensor host(const Tensor& t) { return t.to(Device::kCPU); }

// max |a - b| / max |b| over two fp32 or bf16 tensors of the same size (host copies).
double error(const Tensor& a, const Tensor& b) {
  auto at = [](const Tensor& t, int64_t i) {
    return t.dtype() == DType::kBF16 ? static_cast<double>(bf16_to_fp32(t.bf16_data()[i]))
                                     : static_cast<double>(t.data<float>()[i]);
  };
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    worst = std::max(worst, std::abs(at(a, i) - at(b, i)));
    scale = std::max(scale, std::abs(at(b, i)));
  }
  return scale > 0 ? worst / scale : worst;
}

// The first v columns of N rows ld apart (a GPU's padded fp32 or bf16 gradient rows), contiguous.
Tensor columns_of(const Tensor& rows, int64_t N, int64_t v, int64_t ld) {
  const bool bf16 = rows.dtype() == DType::kBF16;
  Tensor got = Tensor::empty({N, v}, rows.dtype());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < v; ++c) {
      if (bf16)
        got.bf16_data()[i * v + c] = rows.bf16_data()[i * ld + c];
      else
        got.data<float>()[i * v + c] = rows.data<float>()[i * ld + c];
    }
  return got;
}

TEST(CudaVocabParallel, EmbeddingPartsMatchTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const int64_t B = 3, T = 9, C = 32, V = 90, P = 3, v = V / P;
  const Tensor wpe = random_normal({T, C}, 2), dout = random_normal({B, T, C}, 3);
  Tensor tokens = Tensor::empty({B, T}, DType::kI32);
  Rng rng(4);
  for (int64_t i = 0; i < B * T; ++i)
    tokens.data<int32_t>()[i] = static_cast<int32_t>(rng.below(V));
  for (int64_t r = 0; r < P; ++r) {
    const Tensor mine = random_normal({v, C}, 10 + r);
    Tensor out = Tensor::empty({B, T, C}, DType::kF32), got = gpu(out);
    ops::embedding_forward(out, tokens, mine, r == 0 ? wpe : Tensor(), {}, r * v, V);
    ops::embedding_forward(got, gpu(tokens), gpu(mine), r == 0 ? gpu(wpe) : Tensor(), {}, r * v, V);
    EXPECT_EQ(error(host(got), out), 0) << "forward, rank " << r;
    Tensor d = Tensor::empty({v, C}, DType::kF32), dpe = Tensor::empty({T, C}, DType::kF32);
    d.zero_();
    dpe.zero_();
    Tensor gd = gpu(d), gpe = gpu(dpe);
    ops::embedding_backward(d, dpe, dout, tokens, {}, r * v, V);
    ops::embedding_backward(gd, gpe, gpu(dout), gpu(tokens), {}, r * v, V);
    EXPECT_EQ(error(host(gd), d), 0) << "backward, rank " << r;
    EXPECT_EQ(error(host(gpe), dpe), 0) << "positions' backward, rank " << r;
    // The positions' gradient alone (sequence parallelism's own rows).
    Tensor gpe2 = gpu(Tensor::empty({T, C}, DType::kF32));
    gpe2.zero_();
    ops::embedding_backward(Tensor(), gpe2, gpu(dout), gpu(tokens), {}, 0, V);
    EXPECT_EQ(error(host(gpe2), dpe), 0) << "positions alone, rank " << r;
  }
}

// One rank's part of the loss, CPU against GPU; `pad`: the GPU's logits rows padded past V.
void loss_part_matches_the_cpu(bool bf16, double z_loss, bool row_scale, int64_t pad) {
  const int64_t N = 41, V = 150, P = 3, v = V / P;
  const int32_t kIgnore = -100;
  Tensor targets = Tensor::empty({N}, DType::kI32);
  Rng rng(12);
  for (int64_t i = 0; i < N; ++i)
    targets.data<int32_t>()[i] = i % 5 == 2 ? kIgnore : static_cast<int32_t>(rng.below(V));
  Tensor scale;
  if (row_scale) {
    scale = Tensor::empty({N}, DType::kF32);
    for (int64_t i = 0; i < N; ++i) scale.data<float>()[i] = 0.5f + 0.125f * (i % 4);
  }
  std::vector<Tensor> parts;
  for (int64_t r = 0; r < P; ++r) parts.push_back(random_normal({N, v}, 20 + r, 2.0));
  // Every rank's statistics, from the CPU (the gather's result), and this test's GPU's own.
  Tensor all = Tensor::empty({P, N, 3}, DType::kF64);
  for (int64_t r = 0; r < P; ++r)
    ops::softmax_xent_stats(all.view({P * N * 3}).slice(r * N * 3, N * 3), parts[r], targets,
                            kIgnore, r * v, V);
  const Tensor gt = gpu(targets), gs = row_scale ? gpu(scale) : Tensor();
  for (int64_t r = 0; r < P; ++r) {
    // The GPU's logits rows padded to v + pad columns (the padding never read).
    Tensor padded = Tensor::empty({N, v + pad}, DType::kF32);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < v + pad; ++c)
        padded.data<float>()[i * (v + pad) + c] = c < v ? parts[r].data<float>()[i * v + c] : NAN;
    const Tensor gl = gpu(padded);
    Tensor gst = gpu(Tensor::empty({N, 3}, DType::kF64));
    ops::softmax_xent_stats(gst, gl, gt, kIgnore, r * v, V, v);
    // (the GPU writes (lse, 1): compare the statistics through the loss they give)
    const Tensor gall = gpu(all);
    Tensor l = Tensor::empty({N}, DType::kF32), s = Tensor::empty({1}, DType::kF64);
    Tensor d = bf16 ? Tensor::empty({N, v}, DType::kBF16) : parts[r].clone();
    ops::softmax_xent_parallel(l, s, d, bf16 ? parts[r] : d, targets, all, kIgnore, 1.0 / 37,
                               z_loss, r * v, scale);
    Tensor gls = gpu(Tensor::empty({N}, DType::kF32)), gss = gpu(Tensor::empty({1}, DType::kF64));
    Tensor gd = bf16 ? gpu(Tensor::empty({N, v + pad + 8}, DType::kBF16)) : gl;
    ops::softmax_xent_parallel(gls, gss, gd, gl, gt, gall, kIgnore, 1.0 / 37, z_loss, r * v, gs, v);
    EXPECT_LE(error(host(gls), l), 1e-6) << "rank " << r;
    EXPECT_NEAR(host(gss).data<double>()[0], s.data<double>()[0], 1e-9 * s.data<double>()[0]);
    // The gradient of rank r's columns (the GPU's rows: the padded ones, or bf16 ones ld apart).
    const Tensor got = columns_of(host(gd), N, v, bf16 ? v + pad + 8 : v + pad);
    EXPECT_LE(error(got, d), bf16 ? 1.0 / 128 : 1e-5) << "rank " << r;
    // The GPU's own statistics give the same losses.
    Tensor mixed = all.clone();
    const Tensor own = host(gst);
    for (int64_t k = 0; k < N * 3; ++k) mixed.data<double>()[r * N * 3 + k] = own.data<double>()[k];
    ops::softmax_xent_parallel(gls, gss, Tensor(), gpu(padded), gt, gpu(mixed), kIgnore, 0, 0,
                               r * v, Tensor(), v);
    EXPECT_LE(error(host(gls), l), 1e-6) << "rank " << r << " with the GPU's statistics";
  }
}

TEST(CudaVocabParallel, LossPartsMatchTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  loss_part_matches_the_cpu(/*bf16=*/false, 0, false, /*pad=*/0);
  loss_part_matches_the_cpu(/*bf16=*/false, 1e-2, true, /*pad=*/0);
  loss_part_matches_the_cpu(/*bf16=*/true, 0, false, /*pad=*/2);
  loss_part_matches_the_cpu(/*bf16=*/true, 1e-2, true, /*pad=*/2);
}

// Distillation's part of the loss (softmax_distill_stats and softmax_distill_parallel), CPU against
// GPU, the GPU's logits rows padded past V.
void distill_part_matches_the_cpu(bool bf16, int64_t pad) {
  const int64_t N = 33, V = 150, P = 3, v = V / P, S = kDistillStats;
  const int32_t kIgnore = -100;
  const double alpha = 0.4, temperature = 2.5, dloss = 1.0 / 31;
  Tensor targets = Tensor::empty({N}, DType::kI32);
  Rng rng(14);
  for (int64_t i = 0; i < N; ++i)
    targets.data<int32_t>()[i] = i % 5 == 1 ? kIgnore : static_cast<int32_t>(rng.below(V));
  std::vector<Tensor> parts, teacher;
  for (int64_t r = 0; r < P; ++r) {
    parts.push_back(random_normal({N, v}, 30 + r, 2.0));
    teacher.push_back(random_normal({N, v}, 40 + r, 3.0));
  }
  Tensor all = Tensor::empty({P, N, S}, DType::kF64);
  for (int64_t r = 0; r < P; ++r)
    ops::softmax_distill_stats(all.view({P * N * S}).slice(r * N * S, N * S), parts[r], teacher[r],
                               targets, kIgnore, r * v, V, temperature);
  const Tensor gt = gpu(targets), gall = gpu(all);
  for (int64_t r = 0; r < P; ++r) {
    Tensor padded = Tensor::empty({N, v + pad}, DType::kF32);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < v + pad; ++c)
        padded.data<float>()[i * (v + pad) + c] = c < v ? parts[r].data<float>()[i * v + c] : NAN;
    const Tensor gl = gpu(padded), gtch = gpu(teacher[r]);
    // The GPU's statistics of rank r's columns: the CPU's (both are the same lse values).
    Tensor gst = gpu(Tensor::empty({N, S}, DType::kF64));
    ops::softmax_distill_stats(gst, gl, gtch, gt, kIgnore, r * v, V, temperature, v);
    const Tensor own = host(gst);
    for (int64_t k = 0; k < N * S; ++k) {
      const double want = all.data<double>()[r * N * S + k];
      EXPECT_NEAR(own.data<double>()[k], want, 1e-5 * std::abs(want) + 1e-6)
          << "rank " << r << " statistic " << k;
    }
    Tensor l = Tensor::empty({N}, DType::kF32), kl = Tensor::empty({N}, DType::kF32);
    Tensor d = bf16 ? Tensor::empty({N, v}, DType::kBF16) : parts[r].clone();
    ops::softmax_distill_parallel(l, kl, d, bf16 ? parts[r] : d, teacher[r], targets, all, kIgnore,
                                  dloss, alpha, temperature, r * v);
    Tensor gls = gpu(Tensor::empty({N}, DType::kF32)), gkl = gpu(Tensor::empty({N}, DType::kF32));
    Tensor gd = bf16 ? gpu(Tensor::empty({N, v + pad + 8}, DType::kBF16)) : gl;
    ops::softmax_distill_parallel(gls, gkl, gd, gl, gtch, gt, gall, kIgnore, dloss, alpha,
                                  temperature, r * v, v);
    EXPECT_LE(error(host(gls), l), 1e-6) << "rank " << r;
    EXPECT_LE(error(host(gkl), kl), 1e-5) << "rank " << r;
    const Tensor got = columns_of(host(gd), N, v, bf16 ? v + pad + 8 : v + pad);
    EXPECT_LE(error(got, d), bf16 ? 1.0 / 128 : 1e-5) << "rank " << r;
  }
}

TEST(CudaVocabParallel, DistillationPartsMatchTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  distill_part_matches_the_cpu(/*bf16=*/false, /*pad=*/0);
  distill_part_matches_the_cpu(/*bf16=*/false, /*pad=*/3);
  distill_part_matches_the_cpu(/*bf16=*/true, /*pad=*/2);
}

}  // namespace
}  // namespace lmforge
