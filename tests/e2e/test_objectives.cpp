// Fine-tuning objectives end to end. A small GPT-2 pretrained on "<eight random words>\n"
// followed by one of two replies ("Amen, so be it." or "Selah.", at random), then:
// - tuned on pairs that prefer "Amen, so be it.": `lmforge prepare --format preference` (plain
//   pairs, GPT-2's tokenizer), then `lmforge train` with train.objective dpo (from the pretrained
//   run, its own frozen reference; its sigmoid and IPO losses), orpo, simpo and kto (also on
//   single labelled replies, `prepare --format unpaired`). The prompt words carry no signal, so
//   every pair asks the same: prefer the reply;
// - distilled (train.objective distill) into a smaller student with the pretrained run as the
//   teacher.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/rng.h"
#include "testing/metrics.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

// Whether this CPU's fp32 matmuls (oneDNN's sgemm as a linear layer calls it, y = x W^T) give an
// output row the same bits wherever the row sits in the batch. Precomputed reference scores take
// the pairs in another order than the steps do, so the run equals the plain run bit for bit only
// then: on the AVX-512 CPUs tested (Sapphire Rapids, Zen 4: these runs bit for bit), not with
// oneDNN 2.6's AVX2 kernels (Zen 3), which round a row differently by its place in the batch.
bool matmul_rows_position_invariant() {
  Rng rng(1);
  for (const auto [M, N, K] :
       {std::array<int64_t, 3>{128, 96, 64}, {256, 384, 128}, {64, 128, 128}})
    for (const int64_t shift : {1, 3, 8}) {
      std::vector<float> x((M + shift) * K), w(N * K), y(M * N), ys(M * N);
      for (float& v : x) v = static_cast<float>(rng.normal());
      for (float& v : w) v = static_cast<float>(rng.normal());
      cpu::gemm<float>(false, true, M, N, K, 1.f, x.data(), K, w.data(), K, 0.f, y.data(), N);
      cpu::gemm<float>(false, true, M, N, K, 1.f, x.data() + shift * K, K, w.data(), K, 0.f,
                       ys.data(), N);
      if (!std::equal(y.begin() + shift * N, y.end(), ys.begin())) return false;
    }
  return true;
}

// The precomputed run's numbers against the plain run's: bit for bit where the matmuls allow it
// (above), else within rounding (the reference's log-likelihoods differ in their last bits).
void expect_same_run(double got, double plain, const std::string& what) {
  static const bool exact = matmul_rows_position_invariant();
  if (exact)
    EXPECT_EQ(got, plain) << what;
  else
    EXPECT_NEAR(got, plain, 1e-5 * std::abs(plain)) << what << " (matmuls position-dependent)";
}

class ObjectivesE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = testing::temp_dir("preference-e2e");
    const char* words[] = {"river", "stone", "lamp",  "seven", "cedar", "wheat", "iron",  "dove",
                           "salt",  "gate",  "cloud", "horn",  "myrrh", "oil",   "bread", "sword"};
    Rng rng(3);
    auto prompt = [&] {
      std::string p;
      for (int k = 0; k < 8; ++k) p += std::string(k ? " " : "") + words[rng.below(16)];
      return p + "\n";
    };
    {
      std::ofstream base(dir_ + "/base.jsonl"), pairs(dir_ + "/pairs.jsonl"),
          labelled(dir_ + "/labelled.jsonl");
      for (int i = 0; i < 400; ++i) {
        // KTO's unpaired data: one reply each, a third of them the desirable one.
        const bool amen = rng.below(3) == 0;
        labelled << nlohmann::json({{"prompt", prompt()},
                                    {"completion", amen ? "Amen, so be it." : "Selah."},
                                    {"label", amen}})
                        .dump()
                 << "\n";
        base << nlohmann::json({{"text", prompt() + (rng.below(2) ? "Amen, so be it." : "Selah.")}})
                    .dump()
             << "\n";
        pairs << nlohmann::json(
                     {{"prompt", prompt()}, {"chosen", "Amen, so be it."}, {"rejected", "Selah."}})
                     .dump()
              << "\n";
      }
    }
    const std::string prep = "prepare --tokenizer " + tok() + " --val-docs 40 ";
    auto p = testing::run_lmforge(prep + "--input base.jsonl --output base", dir_);
    ASSERT_EQ(p.exit_code, 0) << p.err;
    p = testing::run_lmforge(prep + "--input pairs.jsonl --output pairs --format preference", dir_);
    ASSERT_EQ(p.exit_code, 0) << p.err;
    p = testing::run_lmforge(prep + "--input labelled.jsonl --output labelled --format unpaired",
                             dir_);
    ASSERT_EQ(p.exit_code, 0) << p.err;
    auto r = testing::run_lmforge(
        "train --set model.preset=gpt2-tiny --set model.vocab_size=0 --set data.tokenizer=" +
            tok() +
            " --set data.train=base/data --set data.packing=best_fit --set train.batch_size=8"
            " --set train.seq_len=32 --set train.steps=60 --set train.lr=3e-3"
            " --set train.min_lr=3e-4 --set train.warmup=5 --set train.eval_every=0"
            " --set sample.prompt= --set run.dir=base_run",
        dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static std::string tok() { return testing::shared_tokenizers_dir() + "/gpt2.tiktoken"; }
  // A tuning run from the pretrained one.
  static std::string tune(const std::string& objective, double lr) {
    return "train --set init_from=base_run --set data.train=pairs/data --set data.val=pairs/data "
           "--set train.objective=" +
           objective + " --set train.lr=" + std::to_string(lr) +
           " --set train.batch_size=8 --set train.seq_len=32 --set train.steps=30"
           " --set train.min_lr=1e-5 --set train.warmup=3 --set train.eval_every=30"
           " --set train.checkpoint_every=15 --set train.keep_last=0 --set sample.prompt= ";
  }
  // Greedy decoding from a run's checkpoint answers a prompt with the chosen reply.
  static void expect_answers_amen(const std::string& run) {
    auto g = testing::run_lmforge(
        "generate --checkpoint " + run +
            " --prompt 'cedar salt dove oil gate horn iron lamp\n' --temperature 0 --max-tokens 8",
        dir_);
    ASSERT_EQ(g.exit_code, 0) << g.err;
    EXPECT_NE(g.out.find("lamp\nAmen, so be it.<|endoftext|>"), std::string::npos)
        << run << ": " << g.out;
  }
  static std::string dir_;
};
std::string ObjectivesE2E::dir_;

// DPO starts at log 2 with zero rewards (the reference is the starting policy, computed alike),
// learns to rank every validation pair, and resumes bit-exactly (the reference is rebuilt from
// init_from).
TEST_F(ObjectivesE2E, DpoRanksTheChosenReplyAndResumesExactly) {
  auto r = testing::run_lmforge(tune("dpo", 3e-4) + "--set run.dir=dpo", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("objective: dpo (sigmoid loss, beta 0.1); reference model"),
            std::string::npos)
      << r.out;
  auto steps = testing::records_of(dir_ + "/dpo/metrics.jsonl", "loss");
  ASSERT_EQ(steps.size(), 30u);
  EXPECT_NEAR(steps[0]["loss"].get<double>(), std::log(2.0), 1e-12);
  EXPECT_EQ(steps[0]["reward_chosen"].get<double>(), 0.0);
  EXPECT_EQ(steps[0]["reward_rejected"].get<double>(), 0.0);
  auto val = testing::records_of(dir_ + "/dpo/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 1u);
  // 0.0156, accuracy 1 and margin 4.16 when written.
  EXPECT_LT(val[0]["val_loss"].get<double>(), 0.1);
  EXPECT_EQ(val[0]["val_reward_accuracy"].get<double>(), 1.0);
  EXPECT_GT(val[0]["val_reward_margin"].get<double>(), 2.0);

  std::filesystem::copy(dir_ + "/dpo", dir_ + "/dpo_resumed",
                        std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(dir_ + "/dpo_resumed/checkpoints/step-00000030");
  r = testing::run_lmforge(tune("dpo", 3e-4) + "--set run.dir=dpo_resumed --resume", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto again = testing::records_of(dir_ + "/dpo_resumed/metrics.jsonl", "loss");
  ASSERT_EQ(again.size(), 30u);
  for (size_t i = 15; i < 30; ++i)
    EXPECT_EQ(again[i]["loss"].get<double>(), steps[i]["loss"].get<double>()) << "step " << i + 1;
}

// train.precompute_ref_logps (TRL's precompute_ref_log_probs): the reference's log-likelihoods of
// every pair once, then the reference model released. The same pairs through the same reference
// give the same numbers, so the run is the plain run (its loss at every step and its validation;
// bit for bit where the CPU's matmuls allow, above), in less memory; a resumed run computes them
// again and continues exactly.
TEST_F(ObjectivesE2E, DpoWithPrecomputedReferenceIsThePlainRunInLessMemory) {
  auto r = testing::run_lmforge(tune("dpo", 3e-4) + "--set run.dir=dpo_plain", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string pre = tune("dpo", 3e-4) + "--set train.precompute_ref_logps=true ";
  r = testing::run_lmforge(pre + "--set run.dir=dpo_pre", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("reference: log-likelihoods of 360 training and 40 validation pairs"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("reference log-likelihoods precomputed"), std::string::npos) << r.out;
  auto plain = testing::records_of(dir_ + "/dpo_plain/metrics.jsonl", "loss");
  auto steps = testing::records_of(dir_ + "/dpo_pre/metrics.jsonl", "loss");
  ASSERT_EQ(plain.size(), 30u);
  ASSERT_EQ(steps.size(), 30u);
  for (size_t i = 0; i < 30; ++i)
    expect_same_run(steps[i]["loss"].get<double>(), plain[i]["loss"].get<double>(),
                    "step " + std::to_string(i + 1));
  auto val_plain = testing::records_of(dir_ + "/dpo_plain/metrics.jsonl", "val_loss");
  auto val = testing::records_of(dir_ + "/dpo_pre/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 1u);
  expect_same_run(val[0]["val_loss"].get<double>(), val_plain[0]["val_loss"].get<double>(),
                  "validation");
  // 434 -> 354 MiB when written (the reference's weights and its forward's buffers).
  EXPECT_LT(steps.back()["mem_mib"].get<double>(), plain.back()["mem_mib"].get<double>() - 30);

  std::filesystem::copy(dir_ + "/dpo_pre", dir_ + "/dpo_pre_resumed",
                        std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(dir_ + "/dpo_pre_resumed/checkpoints/step-00000030");
  r = testing::run_lmforge(pre + "--set run.dir=dpo_pre_resumed --resume", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto again = testing::records_of(dir_ + "/dpo_pre_resumed/metrics.jsonl", "loss");
  ASSERT_EQ(again.size(), 30u);
  for (size_t i = 15; i < 30; ++i)
    EXPECT_EQ(again[i]["loss"].get<double>(), steps[i]["loss"].get<double>()) << "step " << i + 1;
}

// DPO with LoRA: the reference is the policy with its adapters off (no second model); it starts
// at log 2 all the same, and learns. Precomputed, its log-likelihoods come from that model once
// (each step then runs no reference forward) and the run is the plain run (bit for bit where the
// matmuls allow).
TEST_F(ObjectivesE2E, DpoWithLoraUsesTheBaseModelAsItsReference) {
  const std::string lora = tune("dpo", 3e-3) + "--set model.lora_rank=8 --set train.steps=10 ";
  auto r = testing::run_lmforge(lora + "--set run.dir=dpo_lora", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("reference model: the policy without its LoRA adapters"), std::string::npos)
      << r.out;
  auto steps = testing::records_of(dir_ + "/dpo_lora/metrics.jsonl", "loss");
  ASSERT_EQ(steps.size(), 10u);
  EXPECT_NEAR(steps[0]["loss"].get<double>(), std::log(2.0), 1e-12);
  EXPECT_LT(steps.back()["loss"].get<double>(), 0.5);

  r = testing::run_lmforge(
      lora + "--set train.precompute_ref_logps=true --set run.dir=dpo_lora_pre", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("pairs in "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("the policy without its LoRA adapters"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("reference log-likelihoods precomputed"), std::string::npos) << r.out;
  auto pre = testing::records_of(dir_ + "/dpo_lora_pre/metrics.jsonl", "loss");
  ASSERT_EQ(pre.size(), 10u);
  for (size_t i = 0; i < 10; ++i)
    expect_same_run(pre[i]["loss"].get<double>(), steps[i]["loss"].get<double>(),
                    "step " + std::to_string(i + 1));
}

// ORPO (no reference): the chosen reply's NLL falls and the odds ratio ranks every pair; greedy
// decoding then answers with it.
TEST_F(ObjectivesE2E, OrpoLearnsTheChosenReply) {
  auto r = testing::run_lmforge(tune("orpo", 1e-3) + "--set run.dir=orpo", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto val = testing::records_of(dir_ + "/orpo/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 1u);
  // nll 0.004, accuracy 1 when written.
  EXPECT_LT(val[0]["val_nll"].get<double>(), 0.05);
  EXPECT_EQ(val[0]["val_reward_accuracy"].get<double>(), 1.0);
  EXPECT_GT(val[0]["val_log_odds"].get<double>(), 2.0);
  expect_answers_amen("orpo");
}

// IPO (train.dpo_loss: ipo): starts at (0 - 1/(2 beta))^2 = 25 exactly (mean log-ratios of 0)
// and falls.
TEST_F(ObjectivesE2E, IpoStartsAtItsTargetMarginAndLearns) {
  auto r = testing::run_lmforge(
      tune("dpo", 3e-4) + "--set train.dpo_loss=ipo --set train.steps=10 --set run.dir=ipo", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("objective: dpo (ipo loss, beta 0.1)"), std::string::npos) << r.out;
  auto steps = testing::records_of(dir_ + "/ipo/metrics.jsonl", "loss");
  ASSERT_EQ(steps.size(), 10u);
  EXPECT_NEAR(steps[0]["loss"].get<double>(), 25.0, 1e-9);
  EXPECT_LT(steps.back()["loss"].get<double>(), 20.0);
  EXPECT_GT(steps.back()["reward_margin"].get<double>(), 0.0);
}

// SimPO (no reference; length-normalized rewards, margin gamma) ranks every validation pair. At
// this learning rate it does so by pushing both replies down (greedy decoding then babbles, as
// observed), so the run that must answer also weighs the chosen replies' NLL (CPO-SimPO,
// cpo_alpha 1); greedy decoding then answers with the chosen reply.
TEST_F(ObjectivesE2E, SimpoLearnsTheChosenReply) {
  for (const char* alpha : {"0", "1"}) {
    const std::string dir = std::string("simpo") + alpha;
    auto r = testing::run_lmforge(
        tune("simpo", 1e-3) + "--set train.cpo_alpha=" + alpha + " --set run.dir=" + dir, dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("objective: simpo (beta 2 gamma 0.5 cpo_alpha " + std::string(alpha)),
              std::string::npos)
        << r.out;
    auto val = testing::records_of(dir_ + "/" + dir + "/metrics.jsonl", "val_loss");
    ASSERT_EQ(val.size(), 1u);
    EXPECT_EQ(val[0]["val_reward_accuracy"].get<double>(), 1.0);
    EXPECT_GT(val[0]["val_reward_margin"].get<double>(), 2.0);
    if (alpha[0] == '0') continue;
    // 0.0068 (nll 0.0068, the SimPO term 4e-5) when written.
    EXPECT_LT(val[0]["val_loss"].get<double>(), 0.1);
    EXPECT_LT(val[0]["val_nll"].get<double>(), 0.05);
    expect_answers_amen(dir);
  }
}

// KTO (no pairs needed): on the pairs, unpaired as TRL does (each chosen reply desirable, each
// rejected one not), and on single labelled replies (`prepare --format unpaired`, a third of them
// desirable). It starts at 0.5 exactly (the reference is the starting policy: log-ratios and the
// KL estimate 0), learns to reward the desirable reply above the other, and greedy decoding then
// answers with it. The labelled run resumes bit-exactly. Then TRL's apo_zero_unpaired loss.
TEST_F(ObjectivesE2E, KtoLearnsTheDesirableReplyFromPairsOrLabelledReplies) {
  for (const std::string data : {"pairs", "labelled"}) {
    const std::string dir = "kto_" + data;
    auto r = testing::run_lmforge(tune("kto", 1e-3) + "--set data.train=" + data +
                                      "/data --set data.val=" + data + "/data --set run.dir=" + dir,
                                  dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("objective: kto (kto loss, beta 0.1, desirable weight 1, undesirable "
                         "weight 1); reference model"),
              std::string::npos)
        << r.out;
    auto steps = testing::records_of(dir_ + "/" + dir + "/metrics.jsonl", "loss");
    ASSERT_EQ(steps.size(), 30u);
    EXPECT_NEAR(steps[0]["loss"].get<double>(), 0.5, 1e-12) << data;
    EXPECT_EQ(steps[0]["kl"].get<double>(), 0.0) << data;
    auto val = testing::records_of(dir_ + "/" + dir + "/metrics.jsonl", "val_loss");
    ASSERT_EQ(val.size(), 1u);
    // loss 0.26 (pairs), 0.17 (labelled); margin 3.4, 4.0 when written.
    EXPECT_LT(val[0]["val_loss"].get<double>(), 0.4) << data;
    EXPECT_GT(val[0]["val_reward_margin"].get<double>(), 1.0) << data;
    EXPECT_GT(val[0]["val_reward_chosen"].get<double>(),
              val[0]["val_reward_rejected"].get<double>())
        << data;
    expect_answers_amen(dir);
  }
  std::filesystem::copy(dir_ + "/kto_labelled", dir_ + "/kto_resumed",
                        std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(dir_ + "/kto_resumed/checkpoints/step-00000030");
  auto r = testing::run_lmforge(tune("kto", 1e-3) +
                                    "--set data.train=labelled/data --set data.val=labelled/data "
                                    "--set run.dir=kto_resumed --resume",
                                dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto steps = testing::records_of(dir_ + "/kto_labelled/metrics.jsonl", "loss");
  auto again = testing::records_of(dir_ + "/kto_resumed/metrics.jsonl", "loss");
  ASSERT_EQ(again.size(), 30u);
  for (size_t i = 15; i < 30; ++i) {
    EXPECT_EQ(again[i]["loss"].get<double>(), steps[i]["loss"].get<double>()) << "step " << i + 1;
    EXPECT_EQ(again[i]["kl"].get<double>(), steps[i]["kl"].get<double>()) << "step " << i + 1;
  }

  // TRL's apo_zero_unpaired: KTO's loss without the KL estimate (no KL rows, no `kl`); it too
  // starts at 0.5 and learns, even one row a micro-batch.
  r = testing::run_lmforge(tune("kto", 1e-3) +
                               "--set train.kto_loss=apo_zero_unpaired --set train.batch_size=1 "
                               "--set train.grad_accum=8 --set train.steps=10 "
                               "--set train.eval_every=10 --set data.train=labelled/data "
                               "--set data.val=labelled/data --set run.dir=kto_apo",
                           dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("objective: kto (apo_zero_unpaired loss"), std::string::npos) << r.out;
  steps = testing::records_of(dir_ + "/kto_apo/metrics.jsonl", "loss");
  ASSERT_EQ(steps.size(), 10u);
  EXPECT_NEAR(steps[0]["loss"].get<double>(), 0.5, 1e-12);
  EXPECT_FALSE(steps[0].contains("kl"));
  EXPECT_LT(steps.back()["loss"].get<double>(), 0.5);
  EXPECT_GT(steps.back()["reward_margin"].get<double>(), 0.0);
}

// Distillation into a student of half the width and depth: the KL to the teacher falls well
// below where it starts (0.74 -> 0.06 when written).
TEST_F(ObjectivesE2E, DistillationPullsTheStudentToTheTeacher) {
  auto r = testing::run_lmforge(
      "train --set model.preset=gpt2-tiny --set model.n_layer=2 --set model.n_embd=64 "
      "--set model.n_head=2 --set model.vocab_size=0 --set data.tokenizer=" +
          tok() +
          " --set data.train=base/data --set data.val=base/data --set data.packing=best_fit"
          " --set train.objective=distill --set train.teacher=base_run"
          " --set train.distill_alpha=0.8 --set train.batch_size=8 --set train.seq_len=32"
          " --set train.steps=60 --set train.lr=3e-3 --set train.min_lr=3e-4 --set train.warmup=5"
          " --set train.eval_every=60 --set sample.prompt= --set run.dir=student",
      dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("objective: distill from base_run"), std::string::npos) << r.out;
  auto steps = testing::records_of(dir_ + "/student/metrics.jsonl", "kl");
  ASSERT_EQ(steps.size(), 60u);
  const double kl0 = steps.front()["kl"].get<double>(), kl1 = steps.back()["kl"].get<double>();
  std::printf("KL to the teacher: %.4f -> %.4f\n", kl0, kl1);
  EXPECT_LT(kl1, kl0 / 4);
  auto val = testing::records_of(dir_ + "/student/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 1u);
  // Cross-entropy, as any run's: 2.53 when written (ln V = 10.8 untrained).
  EXPECT_LT(val[0]["val_loss"].get<double>(), 3.5);

  // A teacher with another tokenizer is refused before anything is written.
  r = testing::run_lmforge(
      "train --set model.preset=gpt2-tiny --set data.text=demo:kjv --set data.tokenizer=byte "
      "--set model.vocab_size=0 --set train.objective=distill --set train.teacher=base_run "
      "--set train.steps=1 --set run.dir=x5",
      dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("distillation needs the same tokenizer"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/x5"));

  // The teacher exported to Hugging Face (its tokenizer now a tokenizer.json, with another
  // fingerprint) has the same vocabulary as this run's GPT-2 tiktoken file: it is taken.
  r = testing::run_lmforge("export --checkpoint base_run --to-hf base_hf", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = testing::run_lmforge(
      "train --set model.preset=gpt2-tiny --set model.vocab_size=0 --set data.tokenizer=" + tok() +
          " --set data.train=base/data --set train.objective=distill"
          " --set train.teacher=hf:base_hf --set train.batch_size=2 --set train.seq_len=32"
          " --set train.steps=1 --set train.eval_every=0 --set sample.prompt= --set run.dir=x6",
      dir_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("objective: distill from hf:base_hf"), std::string::npos) << r.out;
}

TEST_F(ObjectivesE2E, WrongSetUpIsOneClearError) {
  auto r =
      testing::run_lmforge(tune("dpo", 1e-4) + "--set data.train=base/data --set run.dir=x1", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--format preference"), std::string::npos) << r.err;
  r = testing::run_lmforge(tune("orpo", 1e-4) + "--set train.batch_size=5 --set run.dir=x2", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.batch_size: 5 is odd"), std::string::npos) << r.err;
  r = testing::run_lmforge(tune("dpo", 1e-4) + "--set train.z_loss=1e-4 --set run.dir=x3", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.z_loss"), std::string::npos) << r.err;
  r = testing::run_lmforge(tune("dpo", 1e-4) + "--set train.dpo_loss=kto --set run.dir=x8", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.dpo_loss: expected sigmoid, hinge or ipo"), std::string::npos)
      << r.err;
  // Every pair's prompt fills train.seq_len: no targets at all, a loss of 0 for nothing.
  r = testing::run_lmforge(tune("dpo", 1e-4) + "--set train.seq_len=4 --set run.dir=x14", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("no pair has targets within train.seq_len 4"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/x14"));
  r = testing::run_lmforge(tune("ppo", 1e-4) + "--set run.dir=x4", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("expected clm, dpo, orpo, simpo, kto or distill"), std::string::npos)
      << r.err;
  // Precomputed reference log-likelihoods: DPO's alone.
  r = testing::run_lmforge(
      tune("kto", 1e-4) + "--set train.precompute_ref_logps=true --set run.dir=x11", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.precompute_ref_logps: applies to train.objective dpo only"),
            std::string::npos)
      << r.err;
  // KTO's KL estimate needs two rows a micro-batch; labelled replies are KTO's alone.
  r = testing::run_lmforge(tune("kto", 1e-4) + "--set train.batch_size=1 --set run.dir=x9", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("needs at least 2 rows per micro-batch"), std::string::npos) << r.err;
  r = testing::run_lmforge(tune("kto", 1e-4) + "--set train.kto_loss=bco --set run.dir=x13", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.kto_loss: expected kto or apo_zero_unpaired"), std::string::npos)
      << r.err;
  r = testing::run_lmforge(tune("dpo", 1e-4) + "--set data.train=labelled/data --set run.dir=x10",
                           dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("only train.objective kto trains on"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/x1"));
  // The paired shards as next-token data, and lr-find on a preference objective: refused.
  r = testing::run_lmforge(tune("clm", 1e-4) + "--set run.dir=x6", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("only train.objective dpo, orpo, simpo and kto"), std::string::npos)
      << r.err;
  r = testing::run_lmforge(
      "lr-find --set init_from=base_run --set data.train=pairs/data "
      "--set train.objective=dpo --set train.batch_size=8 --set run.dir=x7",
      dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("lr-find: sweeps the next-token loss"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace lmforge
