// Activation checkpointing: selective and full recomputation give bit-identical loss and
// gradients to keeping every activation, with a smaller activation plan.
#include <gtest/gtest.h>

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

Result run(ModelConfig cfg, Recompute mode) {
  const int64_t B = 2, T = 16;
  Transformer m(cfg);
  m.init_weights(5);
  m.plan(B, T, mode);
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
