// Vocabulary parallelism's ops (dist/tensor_parallel.h): the embedding and the cross-entropy over a
// vocabulary split by rows/columns over P ranks, put together as the ranks do (the embeddings'
// rows summed, every rank's loss statistics gathered), against the same ops over the whole
// vocabulary (themselves tested against PyTorch in test_ops_reference). Run at every ISA level.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "lmforge/backend/distill_stats.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "testing/random.h"

namespace lmforge {
namespace {

using testing::random_normal;

// Columns [c0, c0 + n) of a (rows, cols) fp32 matrix, contiguous.
Tensor columns(const Tensor& m, int64_t c0, int64_t n) {
  const int64_t R = m.size(0), C = m.size(1);
  Tensor out = Tensor::empty({R, n}, DType::kF32);
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(out.data<float>() + r * n, m.data<float>() + r * C + c0, sizeof(float) * n);
  return out;
}

// Rank r's columns d (N, v: fp32, or bf16 within an ulp) of a whole gradient (N, V), each within
// rel of its value.
void expect_columns_of(const Tensor& d, const Tensor& whole, int64_t r, double rel) {
  const int64_t N = whole.size(0), V = whole.size(1), v = d.size(1);
  const bool bf16 = d.dtype() == DType::kBF16;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < v; ++c) {
      const float want = whole.data<float>()[i * V + r * v + c];
      const float got = bf16 ? bf16_to_fp32(d.bf16_data()[i * v + c]) : d.data<float>()[i * v + c];
      const double tol = bf16 ? std::abs(want) / 128 + 1e-9 : rel * std::abs(want) + 1e-9;
      ASSERT_NEAR(got, want, tol) << "rank " << r << " row " << i << " column " << c;
    }
}

TEST(VocabParallel, EmbeddingSplitByRowsSumsToTheWhole) {
  const int64_t B = 3, T = 7, C = 24, V = 60, P = 3, v = V / P;
  const Tensor wte = random_normal({V, C}, 1), wpe = random_normal({T, C}, 2),
               dout = random_normal({B, T, C}, 3);
  Tensor tokens = Tensor::empty({B, T}, DType::kI32);
  Rng rng(4);
  for (int64_t i = 0; i < B * T; ++i)
    tokens.data<int32_t>()[i] = static_cast<int32_t>(rng.below(V));
  Tensor whole = Tensor::empty({B, T, C}, DType::kF32), sum = Tensor::empty({B, T, C}, DType::kF32);
  ops::embedding_forward(whole, tokens, wte, wpe);
  sum.zero_();
  Tensor dwte = Tensor::empty({V, C}, DType::kF32), dwpe = Tensor::empty({T, C}, DType::kF32);
  dwte.zero_();
  dwpe.zero_();
  ops::embedding_backward(dwte, dwpe, dout, tokens);
  for (int64_t r = 0; r < P; ++r) {
    // Rank r's rows; the positions added by one rank only (as rank 0 does).
    const Tensor mine = wte.view({V * C}).slice(r * v * C, v * C).view({v, C});
    Tensor part = Tensor::empty({B, T, C}, DType::kF32), dmine = Tensor::empty({v, C}, DType::kF32);
    ops::embedding_forward(part, tokens, mine, r == 0 ? wpe : Tensor(), {}, r * v, V);
    for (int64_t i = 0; i < part.numel(); ++i) sum.data<float>()[i] += part.data<float>()[i];
    dmine.zero_();
    ops::embedding_backward(dmine, Tensor(), dout, tokens, {}, r * v, V);
    // Each row's gradient is the whole table's, bit for bit (the same terms in the same order).
    EXPECT_EQ(
        std::memcmp(dmine.data<float>(), dwte.data<float>() + r * v * C, sizeof(float) * v * C), 0)
        << "rank " << r;
  }
  // One rank holds each token's row, the others add exact zeros: the sum is the whole's.
  EXPECT_EQ(std::memcmp(sum.data<float>(), whole.data<float>(), sizeof(float) * whole.numel()), 0);
  // Ids outside the whole vocabulary are still errors, whichever rows a rank holds.
  tokens.data<int32_t>()[5] = static_cast<int32_t>(V);
  Tensor part = Tensor::empty({B, T, C}, DType::kF32);
  EXPECT_THROW(ops::embedding_forward(part, tokens, wte.view({V * C}).slice(0, v * C).view({v, C}),
                                      Tensor(), {}, 0, V),
               Error);
}

// The loss of rows over P column blocks, as the ranks compute it, against the whole's.
void loss_matches_the_whole(bool bf16, double z_loss, bool row_scale) {
  const int64_t N = 37, V = 96, P = 3, v = V / P;
  const int32_t kIgnore = -100;
  const Tensor logits = random_normal({N, V}, 11, 3.0);
  Tensor targets = Tensor::empty({N}, DType::kI32);
  Rng rng(12);
  for (int64_t i = 0; i < N; ++i)
    targets.data<int32_t>()[i] = i % 7 == 3 ? kIgnore : static_cast<int32_t>(rng.below(V));
  Tensor scale;
  if (row_scale) {
    scale = Tensor::empty({N}, DType::kF32);
    for (int64_t i = 0; i < N; ++i)
      scale.data<float>()[i] = 0.25f + 0.1f * static_cast<float>(i % 5);
  }
  const double dloss = 1.0 / 29;
  Tensor losses = Tensor::empty({N}, DType::kF32), lse = Tensor::empty({1}, DType::kF64);
  Tensor grad = Tensor::empty({N, V}, DType::kF32);
  grad.copy_from(logits);
  ops::softmax_xent_forward_backward(losses, lse, grad, grad, targets, kIgnore, dloss, z_loss, 0,
                                     scale);
  // Every rank's statistics, in rank order (the gather), then each rank's losses and columns.
  Tensor all = Tensor::empty({P, N, 3}, DType::kF64);
  for (int64_t r = 0; r < P; ++r)
    ops::softmax_xent_stats(all.view({P * N * 3}).slice(r * N * 3, N * 3),
                            columns(logits, r * v, v), targets, kIgnore, r * v, V);
  for (int64_t r = 0; r < P; ++r) {
    const Tensor mine = columns(logits, r * v, v);
    Tensor l = Tensor::empty({N}, DType::kF32), s = Tensor::empty({1}, DType::kF64);
    Tensor d = bf16 ? Tensor::empty({N, v}, DType::kBF16) : mine;
    ops::softmax_xent_parallel(l, s, d, mine, targets, all, kIgnore, dloss, z_loss, r * v, scale);
    for (int64_t i = 0; i < N; ++i)
      EXPECT_NEAR(l.data<float>()[i], losses.data<float>()[i],
                  2e-6 * std::abs(losses.data<float>()[i]) + 1e-6)
          << "rank " << r << " row " << i;
    EXPECT_NEAR(s.data<double>()[0], lse.data<double>()[0], 1e-9 * lse.data<double>()[0]);
    // The gradient of rank r's columns: the whole's within fp32 rounding (bf16: within an ulp).
    expect_columns_of(d, grad, r, 1e-6);
  }
  // Without dlogits: the losses alone (evaluation).
  Tensor l = Tensor::empty({N}, DType::kF32), s = Tensor::empty({1}, DType::kF64);
  ops::softmax_xent_parallel(l, s, Tensor(), columns(logits, 0, v), targets, all, kIgnore, 0, 0, 0);
  for (int64_t i = 0; i < N; ++i)
    EXPECT_NEAR(l.data<float>()[i], losses.data<float>()[i],
                2e-6 * std::abs(losses.data<float>()[i]) + 1e-6);
}

TEST(VocabParallel, CrossEntropySplitByColumnsIsTheWhole) {
  loss_matches_the_whole(/*bf16=*/false, /*z_loss=*/0, /*row_scale=*/false);
  loss_matches_the_whole(/*bf16=*/false, /*z_loss=*/1e-2, /*row_scale=*/true);
  loss_matches_the_whole(/*bf16=*/true, /*z_loss=*/0, /*row_scale=*/false);
}

// Knowledge distillation's loss over P column blocks (every rank's statistics gathered), against
// the whole vocabulary's kernel (itself tested against PyTorch in test_objective).
void distill_matches_the_whole(bool bf16, double alpha, double temperature, int64_t N = 29,
                               int64_t V = 90) {
  const int64_t P = 3, v = V / P;
  const int32_t kIgnore = -100;
  const Tensor logits = random_normal({N, V}, 21, 3.0), teacher = random_normal({N, V}, 22, 4.0);
  Tensor targets = Tensor::empty({N}, DType::kI32);
  Rng rng(23);
  for (int64_t i = 0; i < N; ++i)
    targets.data<int32_t>()[i] = i % 6 == 2 ? kIgnore : static_cast<int32_t>(rng.below(V));
  const double dloss = 1.0 / 23;
  Tensor losses = Tensor::empty({N}, DType::kF32), kl = Tensor::empty({N}, DType::kF32);
  Tensor grad = Tensor::empty({N, V}, DType::kF32);
  ops::softmax_distill_forward_backward(losses, kl, grad, logits, teacher, targets, kIgnore, dloss,
                                        alpha, temperature);
  Tensor all = Tensor::empty({P, N, kDistillStats}, DType::kF64);
  for (int64_t r = 0; r < P; ++r)
    ops::softmax_distill_stats(
        all.view({all.numel()}).slice(r * N * kDistillStats, N * kDistillStats),
        columns(logits, r * v, v), columns(teacher, r * v, v), targets, kIgnore, r * v, V,
        temperature);
  for (int64_t r = 0; r < P; ++r) {
    const Tensor mine = columns(logits, r * v, v);
    Tensor l = Tensor::empty({N}, DType::kF32), k = Tensor::empty({N}, DType::kF32);
    Tensor d = bf16 ? Tensor::empty({N, v}, DType::kBF16) : mine;  // (fp32: in place)
    ops::softmax_distill_parallel(l, k, d, mine, columns(teacher, r * v, v), targets, all, kIgnore,
                                  dloss, alpha, temperature, r * v);
    for (int64_t i = 0; i < N; ++i) {
      const float want_l = losses.data<float>()[i], want_k = kl.data<float>()[i];
      EXPECT_NEAR(l.data<float>()[i], want_l, 2e-5 * std::abs(want_l) + 1e-6)
          << "rank " << r << " row " << i;
      EXPECT_NEAR(k.data<float>()[i], want_k, 2e-5 * std::abs(want_k) + 1e-6)
          << "rank " << r << " row " << i;
      if (targets.data<int32_t>()[i] == kIgnore) {
        EXPECT_EQ(l.data<float>()[i], 0.0f);
      }
    }
    expect_columns_of(d, grad, r, 2e-6);
  }
  // Without dlogits: the losses alone.
  Tensor l = Tensor::empty({N}, DType::kF32), k = Tensor::empty({N}, DType::kF32);
  ops::softmax_distill_parallel(l, k, Tensor(), columns(logits, v, v), columns(teacher, v, v),
                                targets, all, kIgnore, 0, alpha, temperature, v);
  for (int64_t i = 0; i < N; ++i)
    EXPECT_NEAR(k.data<float>()[i], kl.data<float>()[i],
                2e-5 * std::abs(kl.data<float>()[i]) + 1e-6);
  // A target outside the whole vocabulary is an error whichever columns a rank holds.
  targets.data<int32_t>()[4] = static_cast<int32_t>(V);
  EXPECT_THROW(ops::softmax_distill_stats(all.view({all.numel()}).slice(0, N * kDistillStats),
                                          columns(logits, 0, v), columns(teacher, 0, v), targets,
                                          kIgnore, 0, V, temperature),
               Error);
}

TEST(VocabParallel, DistillationSplitByColumnsIsTheWhole) {
  distill_matches_the_whole(/*bf16=*/false, /*alpha=*/0.5, /*temperature=*/2.0);
  distill_matches_the_whole(/*bf16=*/false, /*alpha=*/0.9, /*temperature=*/1.0);
  distill_matches_the_whole(/*bf16=*/true, /*alpha=*/0.3, /*temperature=*/3.0);
  // bf16 gradients in several blocks of rows (cpu_rows_bf16: 64 rows of 4096 columns a block)
  distill_matches_the_whole(/*bf16=*/true, /*alpha=*/0.5, /*temperature=*/2.0, /*N=*/150,
                            /*V=*/3 * 4096);
}

}  // namespace
}  // namespace lmforge
