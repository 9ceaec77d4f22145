// The op-level profile (core/profile.h) over a real training step: the calls it counts are the
// model's structure (linear layers per block, LM-head chunks), nested ops make one row, its
// FLOPs are the matmuls', its times add up to no more than the step, and it records nothing
// when off.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "lmforge/backend/ops.h"
#include "lmforge/core/profile.h"
#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {
namespace {

const profile::Row* find(const std::vector<profile::Row>& rows, const std::string& op,
                         const std::string& shape = "") {
  auto it = std::find_if(rows.begin(), rows.end(), [&](const profile::Row& r) {
    return r.op == op && (shape.empty() || r.shape == shape);
  });
  return it == rows.end() ? nullptr : &*it;
}

int64_t calls(const std::vector<profile::Row>& rows, const std::string& op) {
  int64_t n = 0;
  for (const profile::Row& r : rows) n += r.op == op ? r.calls : 0;
  return n;
}

struct Step {
  Transformer model;
  Tensor tok = Tensor::empty({2, 16}, DType::kI32), tgt = Tensor::empty({2, 16}, DType::kI32);
  explicit Step(const ModelConfig& c) : model(c) {
    model.init_weights(3);
    model.plan(2, 16);
    Rng rng(4);
    for (int64_t i = 0; i < tok.numel(); ++i) {
      tok.data<int32_t>()[i] = static_cast<int32_t>(rng.below(c.vocab_size));
      tgt.data<int32_t>()[i] = static_cast<int32_t>(rng.below(c.vocab_size));
    }
  }
  double run() {  // seconds
    auto t0 = std::chrono::steady_clock::now();
    model.params().zero_grad();
    model.forward_backward(tok, tgt);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

TEST(Profile, CountsTheModelsOpsOncePerCall) {
  ModelConfig c = model_preset("gpt2-tiny");
  c.vocab_size = 300;
  Step s(c);
  s.run();  // warm-up, unprofiled
  EXPECT_TRUE(profile::rows().empty());
  profile::enable(true);
  const int steps = 2;
  double seconds = 0;
  for (int i = 0; i < steps; ++i) seconds += s.run();
  std::vector<profile::Row> rows = profile::rows();
  profile::enable(false);
  EXPECT_TRUE(profile::rows().empty()) << "enable(false) clears";

  const int64_t L = c.n_layer, N = 2 * 16, C = c.n_embd;
  const int64_t chunks = (N + s.model.logits_chunk_rows() - 1) / s.model.logits_chunk_rows();
  // Per block: qkv, proj, fc, down; then the LM head once per chunk.
  EXPECT_EQ(calls(rows, "linear_forward"), steps * (4 * L + chunks));
  EXPECT_EQ(calls(rows, "linear_backward"), steps * (4 * L + chunks));
  EXPECT_EQ(calls(rows, "attention_forward"), steps * L);
  EXPECT_EQ(calls(rows, "layernorm_forward"), steps * (2 * L + 1));
  // Rows are keyed by shape: the MLP's up-projection has a row of its own, and the LM head's
  // rows carry exactly its FLOPs (2 R C V a matmul; the backward makes two).
  const profile::Row* fc = find(rows, "linear_forward", fmt::format("(2, 16, {})", c.ffn()));
  ASSERT_NE(fc, nullptr);
  EXPECT_EQ(fc->calls, steps * L);
  const int64_t R = s.model.logits_chunk_rows();
  const std::string head_shape = fmt::format("({}, {})", R, c.vocab_size);
  const profile::Row* head = find(rows, "linear_forward", head_shape);
  const profile::Row* dhead = find(rows, "linear_backward", head_shape);
  ASSERT_NE(head, nullptr);
  ASSERT_NE(dhead, nullptr);
  EXPECT_DOUBLE_EQ(head->flops, head->calls * 2.0 * R * C * c.vocab_size);
  EXPECT_DOUBLE_EQ(dhead->flops, dhead->calls * 4.0 * R * C * c.vocab_size);
  double in_ops = 0;
  for (const profile::Row& r : rows) {
    EXPECT_FALSE(r.gpu);
    EXPECT_GE(r.seconds, 0) << r.op;
    in_ops += r.seconds;
  }
  EXPECT_GT(in_ops, 0);
  EXPECT_LE(in_ops, seconds) << "outermost ops only: their times cannot exceed the steps'";
}

// The matmuls' FLOPs a training step makes, counted by the ops as they run, are what
// ModelConfig::flops_per_token (the MFU and GFLOP/s figures) counts for the weights: 6 a parameter,
// and under LoRA 4 a frozen one (no weight gradient) and 6 an adapter's; a forward alone's are
// forward_flops_per_token's (2 each: a distillation teacher's). Off by at most the parameters no
// matmul reads (biases, norm gains: 1-D).
void expect_matmul_flops_counted(const ModelConfig& c) {
  Step s(c);
  s.run();
  double matmul[2] = {0, 0};  // a training step's, a forward's
  for (int forward = 0; forward < 2; ++forward) {
    profile::enable(true);
    if (forward)
      s.model.forward(s.tok, s.tgt);
    else
      s.run();
    for (const profile::Row& r : profile::rows())
      if (r.op.starts_with("linear_")) matmul[forward] += r.flops;
    profile::enable(false);
  }
  double not_matmul = 0;
  for (const Param& p : s.model.params().params())
    if (p.value.ndim() == 1) not_matmul += static_cast<double>(p.value.numel());
  const int64_t T = s.tok.size(1);
  const double tokens = static_cast<double>(s.tok.numel());
  const double attention = 4.0 * static_cast<double>(c.n_layer * c.n_head * c.head_size() * T);
  const double counted = (c.flops_per_token(T) - 3 * attention) * tokens,
               forward = (c.forward_flops_per_token(T) - attention) * tokens;
  EXPECT_NEAR(matmul[0], counted, 6 * not_matmul * tokens)
      << c.preset << " LoRA rank " << c.lora.rank << ": the ops ran " << matmul[0] / tokens
      << " matmul FLOPs a token, flops_per_token counts " << counted / tokens;
  EXPECT_NEAR(matmul[1], forward, 2 * not_matmul * tokens)
      << c.preset << " LoRA rank " << c.lora.rank << ": a forward ran " << matmul[1] / tokens
      << " matmul FLOPs a token, forward_flops_per_token counts " << forward / tokens;
}

TEST(Profile, MatmulFlopsAreTheModelsFlopCount) {
  ModelConfig gpt = model_preset("gpt2-tiny"), llama = model_preset("llama3-tiny");
  gpt.vocab_size = llama.vocab_size = 300;
  expect_matmul_flops_counted(gpt);
  expect_matmul_flops_counted(llama);
  // GPT-2's block layers are one module each, so each adapter's GEMMs are exactly its own (Llama's
  // fused qkv multiplies by a block-diagonal B of all three).
  gpt.lora.rank = 4;
  expect_matmul_flops_counted(gpt);
}

TEST(Profile, AnOpMadeOfOpsIsOneRow) {
  Tensor logits = Tensor::zeros({4, 10}, DType::kF32), losses = Tensor::empty({4}, DType::kF32);
  Tensor targets = Tensor::zeros({4}, DType::kI32);
  profile::enable(true);
  const double loss = ops::softmax_xent_forward(losses, logits, targets, -1);
  std::vector<profile::Row> rows = profile::rows();
  profile::enable(false);
  EXPECT_NEAR(loss, std::log(10.0), 1e-6);
  ASSERT_EQ(rows.size(), 1u) << rows.size() << " rows, the first " << rows.at(0).op;
  EXPECT_EQ(rows[0].op, "softmax_xent_forward");
  EXPECT_EQ(rows[0].calls, 1);
}

TEST(Profile, ReportSharesAddUpToTheStep) {
  profile::enable(true);
  Tensor a = Tensor::zeros({1000}, DType::kF32);
  for (int i = 0; i < 3; ++i) ops::scale(a, 2.0);
  const std::string r = profile::report(3, 0.01);
  profile::enable(false);
  EXPECT_NE(r.find("profile of 3 step(s), 10.00 ms per step"), std::string::npos) << r;
  EXPECT_NE(r.find("scale"), std::string::npos) << r;
  EXPECT_NE(r.find("outside ops"), std::string::npos) << r;
}

}  // namespace
}  // namespace lmforge
