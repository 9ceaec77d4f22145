// The spike/NaN guard's decisions, and gradient accumulation normalized by target tokens: two
// micro-batches with different numbers of ignored targets must give the full batch's gradient.
#include <gtest/gtest.h>

#include <cmath>

#include "lmforge/core/rng.h"
#include "lmforge/data/loader.h"
#include "lmforge/data/shard.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/models/presets.h"
#include "lmforge/train/guard.h"
#include "lmforge/train/trainer.h"
#include "testing/process.h"

namespace lmforge {
namespace {

TEST(SpikeGuard, SkipsNonFiniteAndOutliersWithoutPoisoningTheStatistics) {
  SpikeGuard g({6.0, 50, 20});
  Rng rng(1);
  for (int i = 0; i < 30; ++i)
    EXPECT_EQ(g.check(3.0 + 0.01 * rng.normal(), 1.0 + 0.01 * rng.normal()),
              SpikeGuard::Verdict::kOk);
  EXPECT_EQ(g.check(std::nan(""), 1.0), SpikeGuard::Verdict::kNonFinite);
  EXPECT_EQ(g.check(3.0, INFINITY), SpikeGuard::Verdict::kNonFinite);
  EXPECT_EQ(g.check(300.0, 1.0), SpikeGuard::Verdict::kSpike);  // a 100x loss
  EXPECT_EQ(g.check(3.0, 100.0), SpikeGuard::Verdict::kOk);     // gradient norms: clipping's job
  EXPECT_EQ(g.consecutive(), 0);
  EXPECT_EQ(g.check(300.0, 1.0), SpikeGuard::Verdict::kSpike);
  EXPECT_EQ(g.check(-INFINITY, 1.0), SpikeGuard::Verdict::kNonFinite);
  EXPECT_EQ(g.consecutive(), 2);
  EXPECT_EQ(g.check(3.0, 1.0), SpikeGuard::Verdict::kOk);  // the statistics are intact
  EXPECT_EQ(g.consecutive(), 0);
  EXPECT_EQ(g.skipped(), 5);
  // A lower loss is never a spike.
  EXPECT_EQ(g.check(0.5, 1.0), SpikeGuard::Verdict::kOk);
  // The state round-trips exactly: two guards then decide alike.
  SpikeGuard h({6.0, 50, 20});
  h.set_state(nlohmann::json::parse(g.state().dump()));
  for (double x : {3.0, 3.2, 3.05, 40.0}) EXPECT_EQ(g.check(x, 1.0), h.check(x, 1.0));
}

TEST(SpikeGuard, NeedsHistoryBeforeJudgingSpikes) {
  SpikeGuard g({6.0, 50, 20});
  EXPECT_EQ(g.check(10.0, 1.0), SpikeGuard::Verdict::kOk);
  EXPECT_EQ(g.check(1000.0, 1.0), SpikeGuard::Verdict::kOk);  // no history yet
}

std::vector<float> grads(Transformer& m) {
  std::vector<float> g;
  for (Param& p : m.params().params())
    g.insert(g.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
  return g;
}

// Early stopping's history: a NaN or infinite validation loss is never the best (nothing would
// beat it, and JSON writes it as null), counts as no improvement, and the state round-trips
// through text as a checkpoint stores it. The best is the lowest loss (as checkpoints/best picks
// it); min_delta decides only early stopping's count.
TEST(EvalHistory, NonFiniteLossesAreNeverTheBestAndTheStateRoundTrips) {
  EvalHistory h;
  EXPECT_FALSE(h.add(2, std::nan(""), 0.0));
  EXPECT_EQ(h.best_step(), -1);
  EXPECT_EQ(h.bad(), 1);
  EvalHistory after_nan(nlohmann::json::parse(h.state().dump()));
  EXPECT_EQ(after_nan.best_step(), -1);
  EXPECT_TRUE(after_nan.add(4, 5.0, 0.0));
  EXPECT_EQ(after_nan.bad(), 0);
  EXPECT_FALSE(after_nan.add(6, INFINITY, 0.0));
  EXPECT_TRUE(after_nan.add(8, 4.5, 0.0));
  // Within min_delta of the reference: the lowest so far (checkpoints/best's), yet no
  // improvement for early stopping, whose reference stays.
  EXPECT_TRUE(after_nan.add(10, 4.45, 0.1));
  EXPECT_FALSE(after_nan.add(12, 4.46, 0.1));
  EvalHistory back(nlohmann::json::parse(after_nan.state().dump()));
  EXPECT_EQ(back.best(), 4.45);
  EXPECT_EQ(back.best_step(), 10);
  EXPECT_EQ(back.reference(), 4.5);
  EXPECT_EQ(back.bad(), 2);
  EXPECT_TRUE(back.add(14, 4.3, 0.1));  // by more than min_delta: both move
  EXPECT_EQ(back.reference(), 4.3);
  EXPECT_EQ(back.bad(), 0);
  // A state saved before the reference was kept apart: it was the best.
  nlohmann::json old = back.state();
  old.erase("reference");
  EXPECT_EQ(EvalHistory(old).reference(), 4.3);
}

TEST(GradAccumulation, UnevenIgnoredTargetsGiveTheFullBatchGradient) {
  ModelConfig cfg = model_preset("llama3-tiny");
  cfg.vocab_size = 61;
  cfg.n_layer = 1;
  const int64_t B = 2, T = 8;
  Transformer micro_model(cfg), full_model(cfg);
  micro_model.init_weights(3);
  full_model.init_weights(3);
  micro_model.set_z_loss(1e-2);
  full_model.set_z_loss(1e-2);
  micro_model.plan(B, T);
  full_model.plan(2 * B, T);

  Rng rng(9);
  std::vector<Batch> micro = {Batch::make(B, T), Batch::make(B, T)};
  std::vector<Batch> full = {Batch::make(2 * B, T)};
  for (int64_t k = 0; k < 2; ++k)
    for (int64_t i = 0; i < B * T; ++i) {
      int32_t tok = static_cast<int32_t>(rng.below(61));
      int32_t tgt = static_cast<int32_t>(rng.below(61));
      // Micro-batch 0 ignores most of its targets, micro-batch 1 none.
      if (k == 0 && i % 4 != 0) tgt = -100;
      micro[k].tokens.data<int32_t>()[i] = full[0].tokens.data<int32_t>()[k * B * T + i] = tok;
      micro[k].targets.data<int32_t>()[i] = full[0].targets.data<int32_t>()[k * B * T + i] = tgt;
    }
  // The training step's gradient accumulation (DataParallel over one process).
  dist::LocalCommunicator one;
  double lm = dist::DataParallel(one, micro_model, DistConfig{}, {}).forward_backward(micro);
  double lf = dist::DataParallel(one, full_model, DistConfig{}, {}).forward_backward(full);
  EXPECT_NEAR(lm, lf, 1e-6 * std::fabs(lf));
  std::vector<float> a = grads(micro_model), b = grads(full_model);
  double max_err = 0, max_ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_err = std::max(max_err, double(std::fabs(a[i] - b[i])));
    max_ref = std::max(max_ref, double(std::fabs(b[i])));
  }
  EXPECT_LT(max_err / max_ref, 1e-5);

  // Averaging the micro-batches' mean losses (dividing by the number of micro-batches) would
  // weight micro-batch 0's few targets 4x too much: the check above would then fail.
  micro_model.params().zero_grad();
  for (const Batch& m : micro) {
    micro_model.forward_backward(m.tokens, m.targets, 0.5);
  }
  std::vector<float> c = grads(micro_model);
  double wrong = 0;
  for (size_t i = 0; i < c.size(); ++i) wrong = std::max(wrong, double(std::fabs(c[i] - b[i])));
  EXPECT_GT(wrong / max_ref, 1e-2) << "the test would not notice per-micro-batch averaging";
}

// Validation loss is the mean over targets, as the training loss: packed batches with few targets
// weigh less, and asking for more batches than the set holds reads each sample once. Reference:
// one batch holding every sample.
TEST(Evaluation, ValidationLossIsTokenWeightedOverTheSetOnce) {
  ModelConfig cfg = model_preset("llama3-tiny");
  cfg.vocab_size = 61;
  cfg.n_layer = 1;
  const int64_t T = 8;
  std::string dir = testing::temp_dir("eval-weighted");
  std::vector<uint32_t> toks;
  std::vector<uint64_t> starts;
  Rng rng(5);
  for (int len : {9, 3, 2, 9, 4}) {  // best_fit: samples with 8, 5+..., few targets
    starts.push_back(toks.size());
    for (int i = 0; i < len; ++i) toks.push_back(static_cast<uint32_t>(rng.below(61)));
  }
  write_shard(dir + "/val.bin", toks, starts);
  auto spec = parse_data_spec(dir + "/val.bin", "data.val");
  auto loader = [&](int64_t B) {
    LoaderOptions o;
    o.batch = B;
    o.seq = T;
    o.packing = "best_fit";
    return Loader(spec, o);
  };
  Loader two = loader(2);
  const int64_t samples = two.num_samples(0);
  ASSERT_GE(samples, 3);
  ASSERT_EQ(samples % 2, 1) << "the last batch of two should hold one padding row";
  Loader all = loader(samples);

  Transformer small(cfg), whole(cfg);
  small.init_weights(3);
  whole.init_weights(3);
  small.plan(2, T);
  whole.plan(samples, T);
  Batch b_all = Batch::make(samples, T), b_two = Batch::make(2, T);
  all.sequential(0, b_all);
  const double want = whole.forward(b_all.tokens, b_all.targets, -100, b_all.doc_ids);
  dist::LocalCommunicator one;
  dist::DataParallel dp(one, small, DistConfig{}, {});
  EXPECT_NEAR(dp.evaluate(two, /*batches=*/100, b_two), want, 1e-6 * std::fabs(want));
  // The old per-batch average of means differs here (the test would notice it).
  double mean_of_means = 0;
  for (int64_t i = 0; i < two.sequential_batches(); ++i) {
    two.sequential(i, b_two);
    mean_of_means +=
        small.forward(b_two.tokens, b_two.targets, -100, b_two.doc_ids) / two.sequential_batches();
  }
  EXPECT_GT(std::fabs(mean_of_means - want), 1e-4 * std::fabs(want));
}

}  // namespace
}  // namespace lmforge
