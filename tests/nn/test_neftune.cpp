// NEFTune (train.neftune_alpha): training forwards add noise uniform in +-alpha / sqrt(T C) to
// the embeddings (the bound Hugging Face's hook uses); evaluation adds none; the same key draws
// the same noise.
#include <gtest/gtest.h>

#include <cmath>

#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {
namespace {

constexpr int64_t kB = 4, kT = 32;

struct StepResult {
  std::vector<float> x0;
  float loss;
};

StepResult train_step(double alpha, uint64_t key, bool training = true) {
  ModelConfig c = model_preset("gpt2-tiny");
  c.vocab_size = 61;
  c.n_layer = 1;
  Transformer m(c);
  m.init_weights(1);
  m.plan(kB, kT);
  if (alpha > 0) m.set_neftune(alpha, key);
  Tensor tok = Tensor::empty({kB, kT}, DType::kI32), tgt = Tensor::empty({kB, kT}, DType::kI32);
  Rng rng(2);
  for (int64_t i = 0; i < kB * kT; ++i) {
    tok.data<int32_t>()[i] = static_cast<int32_t>(rng.below(61));
    tgt.data<int32_t>()[i] = static_cast<int32_t>(rng.below(61));
  }
  StepResult r;
  r.loss = training ? m.forward_backward(tok, tgt) : m.forward(tok, tgt);
  const Tensor& x = m.embeddings();
  r.x0.assign(x.data<float>(), x.data<float>() + x.numel());
  return r;
}

TEST(Neftune, TrainingAddsUniformNoiseInTheBoundAndEvaluationNone) {
  const double alpha = 5, bound = alpha / std::sqrt(static_cast<double>(kT * 128));
  const StepResult plain = train_step(0, 0), noisy = train_step(alpha, 7);
  double mx = 0, sum = 0, sq = 0;
  const size_t n = plain.x0.size();
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(noisy.x0[i]) - plain.x0[i];
    mx = std::max(mx, std::fabs(d));
    sum += d;
    sq += d * d;
  }
  EXPECT_LE(mx, bound * (1 + 1e-5));
  EXPECT_GT(mx, 0.99 * bound);                                       // 16k draws reach the edges
  EXPECT_LT(std::fabs(sum / n), 0.02 * bound);                       // centred
  EXPECT_NEAR(sq / n, bound * bound / 3, 0.03 * bound * bound / 3);  // uniform's variance
  EXPECT_NE(noisy.loss, plain.loss);

  EXPECT_EQ(train_step(alpha, 7).loss, noisy.loss) << "the same key draws the same noise";
  EXPECT_NE(train_step(alpha, 8).loss, noisy.loss);
  const StepResult eval_plain = train_step(0, 0, false), eval_noisy = train_step(alpha, 7, false);
  EXPECT_EQ(eval_noisy.loss, eval_plain.loss) << "evaluation adds no noise";
  EXPECT_EQ(eval_noisy.x0, eval_plain.x0);
}

}  // namespace
}  // namespace lmforge
