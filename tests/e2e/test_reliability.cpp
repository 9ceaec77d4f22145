// Training that users can leave running: the spike/NaN guard skips poisoned steps (injected
// with train.inject_fault) without poisoning the run, a run of skips stops it with one clear
// line, and early stopping ends a run whose validation loss stops improving.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "testing/metrics.h"

namespace lmforge {
namespace {

using testing::run_lmforge;

const char* kTiny =
    "--set model.preset=gpt2-tiny --set model.vocab_size=257 --set model.max_seq_len=32 "
    "--set model.n_layer=1 --set data.text=demo:kjv --set data.tokenizer=byte "
    "--set train.batch_size=4 --set train.seq_len=32 --set train.lr=2e-3 --set train.warmup=5 "
    "--set sample.prompt= --set train.checkpoint_every=0 ";

TEST(SpikeGuard, InjectedNanAndSpikeAreSkippedAndTheRunRecovers) {
  std::string dir = testing::temp_dir("guard");
  auto r = run_lmforge(std::string("train ") + kTiny +
                           "--set train.steps=40 --set train.eval_every=0 "
                           "--set train.spike_window=20 "
                           "--set train.inject_fault=nan@25,spike@30 --set run.dir=run",
                       dir);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  std::map<int64_t, nlohmann::json> steps;
  for (auto& j : testing::records_of(dir + "/run/metrics.jsonl", "step"))
    if (j.contains("lr")) steps[j["step"].get<int64_t>()] = j;
  ASSERT_EQ(steps.size(), 40u);
  EXPECT_EQ(steps[25].value("skipped", ""), "non-finite");
  EXPECT_TRUE(steps[25]["loss"].is_null()) << "NaN is written as null";
  EXPECT_EQ(steps[30].value("skipped", ""), "spike");
  EXPECT_GT(steps[30]["loss"].get<double>(), 50 * steps[29]["loss"].get<double>());
  int skipped = 0;
  for (auto& [s, j] : steps) skipped += j.contains("skipped");
  EXPECT_EQ(skipped, 2) << "only the poisoned steps";
  // The parameters were not poisoned: the loss keeps falling after the faults.
  EXPECT_TRUE(std::isfinite(steps[40]["loss"].get<double>()));
  EXPECT_LT(steps[40]["loss"].get<double>(), steps[24]["loss"].get<double>() + 0.1);
  EXPECT_NE(r.out.find("skipped (non-finite"), std::string::npos) << r.out;
}

TEST(SpikeGuard, TooManySkipsInARowStopTheRun) {
  std::string dir = testing::temp_dir("guard-stop");
  auto r = run_lmforge(std::string("train ") + kTiny +
                           "--set train.steps=20 --set train.eval_every=0 --set train.max_skips=2 "
                           "--set train.inject_fault=nan@5,nan@6,nan@7 --set run.dir=run",
                       dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.max_skips=2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("step 7"), std::string::npos) << r.err;
}

TEST(EarlyStopping, StopsAfterPatienceEvaluationsWithoutImprovement) {
  std::string dir = testing::temp_dir("early");
  // lr so small the validation loss cannot improve by min_delta: the run stops at the third
  // evaluation (the first sets the best; two more without improvement exhaust patience 2).
  auto r = run_lmforge(std::string("train ") + kTiny +
                           "--set train.steps=100 --set train.lr=1e-9 --set train.min_lr=1e-9 "
                           "--set train.eval_every=5 --set train.eval_batches=2 "
                           "--set train.patience=2 --set train.min_delta=0.01 --set run.dir=run",
                       dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("early stopping at step 15"), std::string::npos) << r.out;
  auto val = testing::records_of(dir + "/run/metrics.jsonl", "val_loss");
  EXPECT_EQ(val.size(), 3u);
  EXPECT_NEAR(val.back()["val_ppl"].get<double>(), std::exp(val.back()["val_loss"].get<double>()),
              1e-9);
}

}  // namespace
}  // namespace lmforge
