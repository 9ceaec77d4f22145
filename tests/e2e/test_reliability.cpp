// Training that users can leave running: the spike/NaN guard skips poisoned steps (injected
// with train.inject_fault) without poisoning the run, a run of skips stops it with one clear
// line, and early stopping ends a run whose validation loss stops improving.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
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
  // The dashboard says how the run ended and shows its last steps (not a stale "live" page).
  const std::string page = testing::slurp(dir + "/run/dashboard.html");
  EXPECT_NE(page.find("step 7 of 20 &middot; failed"), std::string::npos) << page.substr(0, 600);
  EXPECT_EQ(page.find("http-equiv=\"refresh\""), std::string::npos);
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
  EXPECT_NE(
      testing::slurp(dir + "/run/dashboard.html").find("step 15 of 100 &middot; stopped early"),
      std::string::npos);
  auto val = testing::records_of(dir + "/run/metrics.jsonl", "val_loss");
  EXPECT_EQ(val.size(), 3u);
  EXPECT_NEAR(val.back()["val_ppl"].get<double>(), std::exp(val.back()["val_loss"].get<double>()),
              1e-9);
}

// A full disk (a file-size limit the save's files pass, SIGXFSZ left as the shell sets it, so
// lmforge itself must keep the signal from ending the process) while a checkpoint is saved: one
// line naming the file, exit 1, and no half-written step-N.tmp left holding space.
TEST(DiskFull, ACheckpointThatCannotBeWrittenIsOneLineAndLeavesNothing) {
  std::string dir = testing::temp_dir("disk-full-train");
  const std::string train =
      std::string(testing::kByteDemoTrain) + "--set train.steps=4 --set train.checkpoint_every=2 ";
  // (the demo corpus and its shards cached first, beyond the limit's reach: a fresh cache's
  // files are larger than it)
  ASSERT_EQ(testing::run_lmforge(train + "--set train.steps=1 --set run.dir=warm", dir).exit_code,
            0);
  auto r = testing::run_lmforge(train + "--set run.dir=run", dir, "ulimit -f 1500;");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("step-00000002.tmp/"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("write failed"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("file-size limit (ulimit -f)"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  // (nor the checkpoints directory this first save made, empty)
  EXPECT_FALSE(std::filesystem::exists(dir + "/run/checkpoints"));
}

TEST(LrFind, SweepsPlotsAndSuggestsWithoutTouchingTheRunDir) {
  std::string dir = testing::temp_dir("lrfind");
  auto r = run_lmforge(std::string("lr-find ") + kTiny +
                           "--set run.dir=run --steps 60 --start 1e-6 --end 10 --out lr.svg",
                       dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir + "/run"));
  // The plot marks the suggestion (a vertical line in the legend as "suggested").
  EXPECT_NE(testing::slurp(dir + "/lr.svg").find(">suggested<"), std::string::npos);
  auto j = nlohmann::json::parse(testing::slurp(dir + "/lr.json"));
  auto lrs = j["lr"].get<std::vector<double>>();
  ASSERT_GE(lrs.size(), 20u);
  EXPECT_DOUBLE_EQ(lrs.front(), 1e-6);
  for (size_t i = 1; i < lrs.size(); ++i)
    EXPECT_NEAR(lrs[i] / lrs[i - 1], std::pow(1e7, 1.0 / 59), 1e-9);
  // The sweep diverges before 10 (the run stops early), and the suggestion is a learning rate
  // at which training still makes progress: well inside the sweep, below the minimum's LR.
  EXPECT_LT(lrs.size(), 60u);
  double suggested = j["suggested"];
  EXPECT_GT(suggested, 1e-5);
  EXPECT_LT(suggested, 1.0);
  EXPECT_NE(r.out.find("suggested lr"), std::string::npos);
  EXPECT_EQ(r.err.find("uncertain"), std::string::npos) << r.err;
  // Started past where the loss falls (it only rises): the suggestion is said to be uncertain.
  r = run_lmforge(std::string("lr-find ") + kTiny +
                      "--set run.dir=run --steps 5 --start 100 --end 1e6 --out high.png "
                      "--set train.patience=2 --set train.eval_every=0",  // (not lr-find's)
                  dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("the loss never fell below its first LR's (1.00e+02)"), std::string::npos)
      << r.err;
}

}  // namespace
}  // namespace lmforge
