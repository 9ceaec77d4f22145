// Activation checkpointing: selective and full recomputation give bit-identical loss and
// gradients to keeping every activation, with a smaller activation plan. bf16 activations (the
// matmul inputs kept in bf16 under bf16 precision) likewise: bit-identical to fp32 ones that the
// matmuls round, with a smaller plan. bf16 matmul outputs (bf16 activations throughout) round
// more, so they are close to the fp32-activation run rather than identical, recompute exactly,
// and plan less again.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {
namespace {

struct Result {
  float loss;
  std::vector<float> grads;
  size_t bytes;
};

Result run(ModelConfig cfg, Recompute mode, bool bf16 = false, bool bf16_acts = true,
           bool bf16_outs = true, bool bf16_att_grads = false, bool keep_logits = false) {
  const int64_t B = 2, T = 16;
  Transformer m(cfg);
  m.init_weights(5);
  if (bf16) m.enable_bf16();
  m.set_bf16_activations(bf16_acts);
  m.set_bf16_matmul_outputs(bf16_outs);
  m.set_bf16_attention_grads(bf16_att_grads);
  m.plan(B, T, mode, keep_logits);
  Tensor tok = Tensor::empty({B, T}, DType::kI32), tgt = Tensor::empty({B, T}, DType::kI32);
  Rng rng(7);
  for (int64_t i = 0; i < B * T; ++i) {
    tok.data<int32_t>()[i] = static_cast<int32_t>(rng.below(cfg.vocab_size));
    tgt.data<int32_t>()[i] = static_cast<int32_t>(rng.below(cfg.vocab_size));
  }
  m.params().zero_grad();
  Result r{m.forward_backward(tok, tgt), {}, m.activation_bytes()};
  for (Param& p : m.params().params())
    r.grads.insert(r.grads.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
  return r;
}

void check(ModelConfig cfg) {
  cfg.vocab_size = 97;
  cfg.n_layer = 3;
  Result none = run(cfg, Recompute::kNone);
  Result sel = run(cfg, Recompute::kSelective);
  Result full = run(cfg, Recompute::kFull);
  for (const Result* r : {&sel, &full}) {
    EXPECT_EQ(r->loss, none.loss);
    ASSERT_EQ(r->grads.size(), none.grads.size());
    EXPECT_EQ(std::memcmp(r->grads.data(), none.grads.data(), none.grads.size() * sizeof(float)),
              0);
  }
  EXPECT_LT(sel.bytes, none.bytes);
  EXPECT_LT(full.bytes, sel.bytes);
}

// Two steps' worth: the loss and every gradient of a forward_backward, for each recompute mode.
void check_bf16_activations(ModelConfig cfg) {
  cfg.vocab_size = 97;
  cfg.n_layer = 3;
  for (Recompute mode : {Recompute::kNone, Recompute::kSelective, Recompute::kFull}) {
    SCOPED_TRACE(static_cast<int>(mode));
    Result f32 = run(cfg, mode, /*bf16=*/true, /*bf16_acts=*/false);
    Result b16 = run(cfg, mode, /*bf16=*/true, /*bf16_acts=*/true, /*bf16_outs=*/false);
    EXPECT_EQ(b16.loss, f32.loss);
    ASSERT_EQ(b16.grads.size(), f32.grads.size());
    EXPECT_EQ(std::memcmp(b16.grads.data(), f32.grads.data(), f32.grads.size() * sizeof(float)), 0);
    EXPECT_LT(b16.bytes, f32.bytes);
    std::printf("  recompute %d: activations %zu -> %zu bytes\n", static_cast<int>(mode), f32.bytes,
                b16.bytes);
  }
  // And bf16 differs from fp32 at all (the bf16 path is taken).
  EXPECT_NE(run(cfg, Recompute::kNone, true).loss, run(cfg, Recompute::kNone, false).loss);
}

// bf16 matmul outputs: every recompute mode gives the kNone run's loss and gradients bit for bit,
// with a smaller plan than bf16 matmul inputs alone; against the fp32-activation run (the same
// model and batch) the loss is within 0.1% and the gradients within 2% (relative L2; ~0.4% seen),
// which is bf16 rounding of the activations, not a different computation.
// grads: attention's gradients in bf16 too (the GPU's default).
void check_bf16_matmul_outputs(ModelConfig cfg, bool grads = false) {
  cfg.vocab_size = 97;
  cfg.n_layer = 3;
  const Result f32 = run(cfg, Recompute::kNone, true, /*bf16_acts=*/false);
  const Result ins = run(cfg, Recompute::kNone, true, true, /*bf16_outs=*/false);
  const Result none = run(cfg, Recompute::kNone, true, true, true, grads);
  for (Recompute mode : {Recompute::kSelective, Recompute::kFull}) {
    SCOPED_TRACE(static_cast<int>(mode));
    Result r = run(cfg, mode, true, true, true, grads);
    EXPECT_EQ(r.loss, none.loss);
    ASSERT_EQ(r.grads.size(), none.grads.size());
    EXPECT_EQ(std::memcmp(r.grads.data(), none.grads.data(), none.grads.size() * sizeof(float)), 0);
  }
  EXPECT_LT(none.bytes, ins.bytes);
  EXPECT_NE(none.loss, ins.loss);  // the path is taken
  if (grads) {  // bf16 d(att) and d(qkv) make the gradient scratch smaller (not with q/k norms)
    const size_t without = run(cfg, Recompute::kNone, true).bytes;
    if (cfg.qk_norm)
      EXPECT_EQ(none.bytes, without);
    else
      EXPECT_LT(none.bytes, without);
  }
  EXPECT_NEAR(none.loss, f32.loss, 1e-3 * f32.loss);
  double diff = 0, ref = 0;
  for (size_t i = 0; i < f32.grads.size(); ++i) {
    diff += std::pow(double(none.grads[i]) - f32.grads[i], 2);
    ref += std::pow(double(f32.grads[i]), 2);
  }
  const double rel = std::sqrt(diff / ref);
  std::printf(
      "  loss %.6f vs %.6f (fp32 activations); gradients rel. L2 %.4f; activations %zu -> "
      "%zu bytes\n",
      none.loss, f32.loss, rel, ins.bytes, none.bytes);
  EXPECT_LT(rel, 0.02);
}

TEST(Bf16MatmulOutputs, CloseToFp32ActivationsGpt2) {
  check_bf16_matmul_outputs(model_preset("gpt2-tiny"));
}
TEST(Bf16MatmulOutputs, CloseToFp32ActivationsLlama) {
  check_bf16_matmul_outputs(model_preset("llama3-tiny"));
}
TEST(Bf16MatmulOutputs, CloseToFp32ActivationsQwen3Style) {  // q/k norms keep attention fp32
  ModelConfig c = model_preset("llama3-tiny");
  c.qk_norm = true;
  c.sliding_window = 5;
  check_bf16_matmul_outputs(c);
  check_bf16_matmul_outputs(c, /*grads=*/true);  // which then stay fp32 as well
}
TEST(Bf16MatmulOutputs, WithBf16AttentionGradientsGpt2) {
  check_bf16_matmul_outputs(model_preset("gpt2-tiny"), /*grads=*/true);
}
TEST(Bf16MatmulOutputs, WithBf16AttentionGradientsLlama) {
  check_bf16_matmul_outputs(model_preset("llama3-tiny"), /*grads=*/true);
}

TEST(Bf16Activations, BitIdenticalToFp32ActivationsGpt2) {
  check_bf16_activations(model_preset("gpt2-tiny"));
}
TEST(Bf16Activations, BitIdenticalToFp32ActivationsLlama) {
  check_bf16_activations(model_preset("llama3-tiny"));
}

// Gemma 3's shape: GeGLU, scaled embeddings, 1 + w norms, q/k norms, post norms (the branches
// kept fp32 for them), windows on layers 0 and 2 with their own RoPE base.
ModelConfig gemma3_style() {
  ModelConfig c = model_preset("llama3-tiny");
  c.arch = "gemma3";
  c.mlp = "geglu";
  c.embed_scale = c.qk_norm = c.post_norms = c.tie_embeddings = true;
  c.norm_offset = 1;
  c.sliding_window = 5;
  c.full_attention_every = 2;
  c.rope_theta = 1e6;
  c.rope_local_theta = 1e4;
  return c;
}
TEST(Bf16MatmulOutputs, CloseToFp32ActivationsGemma3Style) {
  check_bf16_matmul_outputs(gemma3_style());
  check_bf16_matmul_outputs(gemma3_style(), /*grads=*/true);
}
TEST(Bf16Activations, BitIdenticalToFp32ActivationsGemma3Style) {
  check_bf16_activations(gemma3_style());
}
TEST(ActivationCheckpointing, BitIdenticalGradientsWithLessMemoryGemma3Style) {
  check(gemma3_style());
}

// Gemma 2's: post norms without q/k norms, windows on every other layer, scores scaled by
// 24^-1/2 and soft-capped, logits soft-capped (the caps low enough to bend this model's scores
// and logits; the logits' gradient through the cap into bf16 dlogits under bf16 matmuls).
ModelConfig gemma2_style() {
  ModelConfig c = gemma3_style();
  c.arch = "gemma2";
  c.qk_norm = false;
  c.rope_local_theta = 0;
  c.rope_theta = 1e4;
  c.attn_scale_dim = 24;
  c.attn_softcap = 0.5;
  c.logit_softcap = 0.3;
  return c;
}
TEST(Bf16MatmulOutputs, CloseToFp32ActivationsGemma2Style) {
  check_bf16_matmul_outputs(gemma2_style());
  check_bf16_matmul_outputs(gemma2_style(), /*grads=*/true);
}
TEST(Bf16Activations, BitIdenticalToFp32ActivationsGemma2Style) {
  check_bf16_activations(gemma2_style());
}
TEST(ActivationCheckpointing, BitIdenticalGradientsWithLessMemoryGemma2Style) {
  check(gemma2_style());
}
// Training with the whole logits kept (plan(..., keep_logits)) takes them through the cap alike.
TEST(LogitSoftcap, KeptLogitsTrainAlike) {
  ModelConfig c = gemma2_style();
  c.vocab_size = 97;
  const Result chunked = run(c, Recompute::kNone);
  const Result kept = run(c, Recompute::kNone, false, true, true, false, /*keep_logits=*/true);
  EXPECT_EQ(kept.loss, chunked.loss);
  ASSERT_EQ(kept.grads.size(), chunked.grads.size());
  EXPECT_EQ(std::memcmp(kept.grads.data(), chunked.grads.data(), kept.grads.size() * sizeof(float)),
            0);
  // (and the cap bends this model's logits: without it the loss differs)
  c.logit_softcap = 0;
  EXPECT_NE(run(c, Recompute::kNone).loss, chunked.loss);
}

TEST(ActivationCheckpointing, BitIdenticalGradientsWithLessMemoryGpt2) {
  check(model_preset("gpt2-tiny"));
}
TEST(ActivationCheckpointing, BitIdenticalGradientsWithLessMemoryQwen3Style) {
  ModelConfig c = model_preset("llama3-tiny");
  c.qk_norm = true;
  c.sliding_window = 5;
  check(c);
}

}  // namespace
}  // namespace lmforge
