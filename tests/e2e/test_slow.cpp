// Longer end-to-end checks (CTest label `slow`; run with scripts/test.sh --slow).
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "testing/process.h"

namespace lmforge {

namespace fs = std::filesystem;
using testing::run_lmforge;

namespace {
std::vector<nlohmann::json> records(const std::string& path, const std::string& key) {
  std::vector<nlohmann::json> out;
  std::istringstream in(testing::slurp(path));
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains(key)) out.push_back(j);
  }
  return out;
}
}  // namespace

// The README's main job: `lmforge train` on the embedded default, then generate. Measured when
// written: val loss 5.55 -> 1.74 after 1000 steps (train loss ~1.5).
TEST(Slow, EmbeddedDefaultTrainsAndSamples) {
  std::string dir = testing::temp_dir("slow-demo");
  auto r = run_lmforge("train", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("--- sample ---\nAnd God said"), std::string::npos) << r.out;
  auto val = records(dir + "/runs/demo/metrics.jsonl", "val_loss");
  ASSERT_FALSE(val.empty());
  EXPECT_LT(val.back()["val_loss"].get<double>(), 1.95);
  auto g = run_lmforge("generate --checkpoint runs/demo --prompt 'In the beginning' --seed 1", dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_GT(g.out.size(), 100u);
}

// Bit-exact resume for the Llama family too (RoPE, GQA, SwiGLU, RMSNorm, untied head).
TEST(Slow, Llama3TinyResumeIsBitExact) {
  std::string dir = testing::temp_dir("slow-llama-resume");
  std::string common =
      "--set model.preset=llama3-tiny --set model.vocab_size=257 --set data.text=demo:kjv "
      "--set train.batch_size=4 --set train.seq_len=64 --set train.steps=30 "
      "--set train.checkpoint_every=10 --set train.keep_last=0 --set train.eval_every=15 "
      "--set sample.prompt= ";
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=a", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=b", dir).exit_code, 0);
  fs::remove_all(dir + "/b/checkpoints/step-00000030");
  fs::remove_all(dir + "/b/checkpoints/step-00000020");
  auto r = run_lmforge("train " + common + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto a = records(dir + "/a/metrics.jsonl", "loss"), b = records(dir + "/b/metrics.jsonl", "loss");
  ASSERT_EQ(a.size(), 30u);
  ASSERT_EQ(b.size(), 30u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i]["loss"], b[i]["loss"]) << "step " << i + 1;
  EXPECT_EQ(records(dir + "/a/metrics.jsonl", "val_loss"),
            records(dir + "/b/metrics.jsonl", "val_loss"));
  EXPECT_EQ(testing::slurp(dir + "/a/checkpoints/step-00000030/model.safetensors"),
            testing::slurp(dir + "/b/checkpoints/step-00000030/model.safetensors"));
}

}  // namespace lmforge
