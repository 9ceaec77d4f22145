// Supervised fine-tuning end to end: `lmforge prepare --format chat` on JSONL conversations, then
// `lmforge train` on the shards with best-fit packing. The user turns are random words (several
// nats per token, unlearnable) and every assistant reply is the same: with the loss on the
// assistant's tokens only, the loss falls near 0; had the user's tokens counted, it could not
// fall below a few nats.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "e2e/crash_resume.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/io/safetensors.h"
#include "testing/metrics.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

TEST(Sft, AssistantOnlyLossLearnsTheRepliesAndIgnoresTheUsers) {
  const std::string dir = testing::temp_dir("sft-e2e");
  const std::string tok = testing::shared_tokenizers_dir() + "/llama3.tiktoken";
  const char* words[] = {"river", "stone", "lamp",  "seven", "cedar", "wheat", "iron",  "dove",
                         "salt",  "gate",  "cloud", "horn",  "myrrh", "oil",   "bread", "sword"};
  {
    Rng rng(3);
    std::ofstream f(dir + "/chat.jsonl");
    for (int i = 0; i < 400; ++i) {
      std::string user;
      for (int k = 0; k < 12; ++k) user += std::string(k ? " " : "") + words[rng.below(16)];
      nlohmann::json c = {{"messages",
                           {{{"role", "user"}, {"content", user}},
                            {{"role", "assistant"}, {"content", "Amen, so be it."}}}}};
      f << c.dump() << "\n";
    }
  }
  auto p = testing::run_lmforge("prepare --input chat.jsonl --output shards --tokenizer " + tok +
                                    " --format chat --chat-template llama3 --val-docs 40",
                                dir);
  ASSERT_EQ(p.exit_code, 0) << p.err;

  auto r = testing::run_lmforge(
      "train --set model.preset=llama3-tiny --set model.vocab_size=0 --set data.tokenizer=" + tok +
          " --set data.train=shards/data --set data.val=shards/data --set data.packing=best_fit"
          " --set train.batch_size=4 --set train.seq_len=64 --set train.steps=60"
          " --set train.lr=3e-3 --set train.min_lr=3e-4 --set train.warmup=5"
          " --set train.eval_every=60 --set train.eval_batches=10 --set sample.prompt="
          " --set run.dir=run",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto val = testing::records_of(dir + "/run/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 1u);
  const double vl = val.back()["val_loss"];
  // "Amen, so be it.<|eot_id|>" after the assistant header: learned within 60 steps (0.0045 when
  // written); ln(16) = 2.8 nats per random user word, were those targets too.
  EXPECT_LT(vl, 0.3);

  // Asked in the template it was tuned with, the model gives the reply and stops at <|eot_id|>.
  auto g = testing::run_lmforge(
      "generate --checkpoint run --chat-template llama3 --prompt 'cedar salt dove' "
      "--temperature 0 --max-tokens 20",
      dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(g.out, "Amen, so be it.\n");
  auto bad = testing::run_lmforge("generate --checkpoint run --system hi --prompt x", dir);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("--chat-template"), std::string::npos) << bad.err;

  // chat: a conversation on stdin. Every user turn gets the reply, after /reset too, and when
  // the conversation outgrows the context its oldest exchanges are dropped; a turn that alone
  // does not fit is one error line, and the conversation goes on.
  {
    std::ofstream turns(dir + "/turns.txt");
    turns << "cedar salt dove\nriver stone lamp\n/reset\nseven wheat\n";
    for (int i = 0; i < 12; ++i)
      turns << "iron gate cloud horn myrrh oil bread sword river stone\n";
    for (int i = 0; i < 200; ++i) turns << "salt ";
    turns << "\nlamp dove\n/exit\nnever read\n";
  }
  auto c = testing::run_lmforge(
      "chat --checkpoint run --chat-template llama3 --temperature 0 --max-tokens 20 < turns.txt",
      dir);
  ASSERT_EQ(c.exit_code, 0) << c.err;
  std::string want;
  for (int i = 0; i < 16; ++i) want += "Amen, so be it.\n";
  EXPECT_EQ(c.out, want);
  EXPECT_NE(c.err.find("beyond the model's context"), std::string::npos) << c.err;
  EXPECT_NE(c.err.find("the oldest turns no longer fit the context: dropped"), std::string::npos)
      << c.err;
  auto nochat = testing::run_lmforge("chat --checkpoint run < turns.txt", dir);
  EXPECT_EQ(nochat.exit_code, 1);
  EXPECT_NE(nochat.err.find("--chat-template"), std::string::npos) << nochat.err;
}

namespace {

// The loss records of run dir/name, which ran kResumeRun's 8 steps.
std::vector<nlohmann::json> losses8(const std::string& dir, const std::string& name) {
  auto l = testing::records_of(dir + "/" + name + "/metrics.jsonl", "loss");
  EXPECT_EQ(l.size(), 8u) << name;
  l.resize(8);  // (missing steps: null, which get<double>() refuses)
  return l;
}

// 8 steps of a 2-layer GPT-2 (grad_accum 2, a checkpoint every 4) with `extra` on top of `base`,
// twice (a, and b interrupted after step 4 and resumed) and without `extra` (plain): b's losses
// equal a's bit for bit at every step, and differ from plain's from step `differs_from` on (the
// earlier ones equal).
const std::string kResumeRun =
    "train --set model.preset=gpt2-tiny --set model.n_layer=2 --set model.vocab_size=257 "
    "--set model.max_seq_len=64 --set data.text=demo:kjv --set data.tokenizer=byte "
    "--set train.batch_size=4 --set train.seq_len=64 --set train.grad_accum=2 "
    "--set train.steps=8 --set train.checkpoint_every=4 --set train.keep_last=0 "
    "--set train.eval_every=0 --set sample.prompt= ";
void expect_resume_bit_exact(const std::string& dir, const std::string& base,
                             const std::string& extra, size_t differs_from) {
  const std::string with = base + extra;
  ASSERT_EQ(testing::run_lmforge(with + "--set run.dir=a", dir).exit_code, 0);
  ASSERT_EQ(testing::run_lmforge(with + "--set run.dir=b", dir).exit_code, 0);
  ASSERT_EQ(testing::run_lmforge(base + "--set run.dir=plain", dir).exit_code, 0);
  std::filesystem::remove_all(dir + "/b/checkpoints/step-00000008");
  auto r = testing::run_lmforge(with + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto a = losses8(dir, "a"), b = losses8(dir, "b"), p = losses8(dir, "plain");
  for (size_t i = 0; i < 8; ++i) {
    const double la = a[i]["loss"].get<double>(), lp = p[i]["loss"].get<double>();
    EXPECT_EQ(la, b[i]["loss"].get<double>()) << "step " << i + 1;
    if (i + 1 < differs_from) {
      EXPECT_EQ(la, lp) << "step " << i + 1;
    } else {
      EXPECT_NE(la, lp) << "step " << i + 1;
    }
  }
}

}  // namespace

// NEFTune's noise comes from (seed, step, rank, micro-batch): an interrupted and resumed run
// equals an uninterrupted one bit for bit, and differs from a run without noise.
TEST(Neftune, ResumeIsBitExactAndTheNoiseIsApplied) {
  expect_resume_bit_exact(testing::temp_dir("neftune-e2e"), kResumeRun,
                          "--set train.neftune_alpha=5 ", 1);
}

// LoRA's dropout masks come from (seed, step, rank, micro-batch), as NEFTune's noise: an
// interrupted and resumed run equals an uninterrupted one bit for bit, and differs from a run
// without dropout from the second step on (B starts at 0: the first loss is the base model's).
// With tensor parallelism it is one clear error.
TEST(Lora, DropoutResumesBitExactly) {
  const std::string dir = testing::temp_dir("lora-dropout-e2e");
  const std::string lora = kResumeRun + "--set model.lora_rank=4 --set train.lr=1e-2 ";
  const std::string dropped = lora + "--set model.lora_dropout=0.1 ";
  expect_resume_bit_exact(dir, lora, "--set model.lora_dropout=0.1 ", 2);
  testing::RunResult r;
  r = testing::run_lmforge(
      "launch --nproc 2 -- " + dropped + "--set dist.tensor_parallel=2 --set run.dir=tp", dir);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE((r.err + r.out).find("model.lora_dropout: not with dist.tensor_parallel"),
            std::string::npos)
      << r.err << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir + "/tp/checkpoints"));
  // Dropout without adapters would do nothing: one clear error.
  r = testing::run_lmforge(
      "train --set model.preset=gpt2-tiny --set model.lora_dropout=0.1 --set run.dir=none", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("model.lora_dropout: 0.1 drops the LoRA adapters' input, but the model has "
                       "none"),
            std::string::npos)
      << r.err;
}

// LoRA under bf16 master weights: the frozen weights bf16 alone, the adapters with fp32 masters in
// the optimizer's state (checkpointed as w.<name>). From a source whose weights (adapters
// included) are bf16 values the run is the fp32-master run bit for bit (the adapters' updates
// are those of fp32 masters, their bf16 copies rounded to nearest; bf16 masters alone would round
// stochastically); it resumes bit for bit, and resuming an fp32-master run's checkpoint with bf16
// master weights takes its fp32 adapters as the masters and goes on as that run.
TEST(Lora, Bf16MasterWeightsKeepFp32AdapterMasters) {
  const std::string dir = testing::temp_dir("lora-bf16-masters-e2e");
  const std::string bf16 = "--set train.precision=bf16 ";
  const std::string master = "--set train.master_weights=bf16 ";
  const std::string adapters = "--set model.lora_rank=4 --set train.lr=1e-2 ";
  auto r = testing::run_lmforge(kResumeRun + bf16 + master + adapters + "--set run.dir=base", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string lora =
      kResumeRun + bf16 + adapters + "--set init_from=base/checkpoints/step-00000008 ";
  for (const std::string run : {"a", "b"})
    ASSERT_EQ(testing::run_lmforge(lora + master + "--set run.dir=" + run, dir).exit_code, 0);
  ASSERT_EQ(testing::run_lmforge(lora + "--set run.dir=f", dir).exit_code, 0);
  std::filesystem::remove_all(dir + "/b/checkpoints/step-00000008");
  r = testing::run_lmforge(lora + master + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // f's run from its step-4 checkpoint under bf16 master weights.
  std::filesystem::copy(dir + "/f", dir + "/c", std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(dir + "/c/checkpoints/step-00000008");
  r = testing::run_lmforge(lora + master + "--set run.dir=c --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // And a's from its step-4 checkpoint under fp32 master weights: the adapters continue from the
  // masters it saved (w.), not their bf16 values.
  std::filesystem::copy(dir + "/a", dir + "/d", std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(dir + "/d/checkpoints/step-00000008");
  r = testing::run_lmforge(lora + "--set run.dir=d --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto a = losses8(dir, "a"), b = losses8(dir, "b"), c = losses8(dir, "c"), f = losses8(dir, "f"),
       d = losses8(dir, "d");
  for (size_t i = 0; i < 8; ++i) {
    const double la = a[i]["loss"].get<double>();
    EXPECT_EQ(la, b[i]["loss"].get<double>()) << "resumed, step " << i + 1;
    EXPECT_EQ(la, f[i]["loss"].get<double>()) << "fp32 masters, step " << i + 1;
    EXPECT_EQ(la, c[i]["loss"].get<double>()) << "from fp32 masters, step " << i + 1;
    EXPECT_EQ(la, d[i]["loss"].get<double>()) << "to fp32 masters, step " << i + 1;
  }
  // --reset-optimizer from a's step-4 checkpoint: fresh moments and masters taken from the loaded
  // values (widened), as fp32 master weights resumed the same way take the adapters.
  for (const std::string run : {"ra", "rf"}) {
    std::filesystem::copy(dir + "/a", dir + "/" + run, std::filesystem::copy_options::recursive);
    std::filesystem::remove_all(dir + "/" + run + "/checkpoints/step-00000008");
    r = testing::run_lmforge(
        lora + (run == "ra" ? master : "") + "--set run.dir=" + run + " --resume --reset-optimizer",
        dir);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  auto ra = losses8(dir, "ra"), rf = losses8(dir, "rf");
  for (size_t i = 4; i < 8; ++i)
    EXPECT_EQ(ra[i]["loss"].get<double>(), rf[i]["loss"].get<double>())
        << "reset optimizer, step " << i + 1;
  const std::string step8 = "/checkpoints/step-00000008/";
  Safetensors ma = Safetensors::open(dir + "/a" + step8 + "model.safetensors"),
              oa = Safetensors::open(dir + "/a" + step8 + "optimizer.safetensors"),
              mf = Safetensors::open(dir + "/f" + step8 + "model.safetensors");
  EXPECT_EQ(testing::slurp(dir + "/a" + step8 + "optimizer.safetensors"),
            testing::slurp(dir + "/b" + step8 + "optimizer.safetensors"));
  const std::string adapter = "blocks.1.attn.qkv.lora_a";
  EXPECT_EQ(ma.info(adapter).dtype, "BF16");
  EXPECT_EQ(ma.info("blocks.1.attn.qkv.weight").dtype, "BF16");
  ASSERT_TRUE(oa.has("w." + adapter));
  EXPECT_EQ(oa.info("w." + adapter).dtype, "F32");
  EXPECT_FALSE(oa.has("w.blocks.1.attn.qkv.weight"));  // (frozen: no optimizer state)
  // The masters are the fp32-master run's adapters; the checkpoint's values their nearest bf16.
  const Tensor w = oa.get("w." + adapter), wf = mf.get(adapter), v = ma.get(adapter),
               wd = Safetensors::open(dir + "/d" + step8 + "model.safetensors").get(adapter);
  ASSERT_EQ(w.nbytes(), wf.nbytes());
  EXPECT_EQ(std::memcmp(w.raw(), wf.raw(), w.nbytes()), 0);
  ASSERT_EQ(w.nbytes(), wd.nbytes());
  EXPECT_EQ(std::memcmp(w.raw(), wd.raw(), w.nbytes()), 0) << "resumed with fp32 masters";
  for (int64_t i = 0; i < w.numel(); ++i)
    ASSERT_EQ(static_cast<const uint16_t*>(v.raw())[i], fp32_to_bf16_ftz(w.data<float>()[i])) << i;
}

// LoRA from a pretrained checkpoint by config keys alone: the adapters learn, the base weights in
// the run's checkpoints stay those of the source bit for bit, AdamW keeps state for the adapters
// only, the run resumes, and the export merges the adapters.
TEST(Lora, FineTunesAdaptersOnTopOfACheckpoint) {
  const std::string dir = testing::temp_dir("lora-e2e");
  const std::string data =
      "--set data.text=demo:kjv --set data.tokenizer=byte --set train.batch_size=8 "
      "--set train.seq_len=64 --set train.eval_every=0 --set sample.prompt= ";
  auto r = testing::run_lmforge(
      "train --set model.preset=gpt2-tiny --set model.vocab_size=257 "
      "--set model.max_seq_len=64 --set train.steps=20 " +
          data + "--set run.dir=base",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // (model.vocab_size 0, "the tokenizer's", is the source's: not a conflict with it)
  const std::string lora =
      "train --set init_from=base --set model.lora_rank=8 --set model.vocab_size=0 "
      "--set train.lr=1e-2 --set train.checkpoint_every=20 " +
      data + "--set run.dir=lora ";
  r = testing::run_lmforge(lora + "--set train.steps=40", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("trainable parameters"), std::string::npos) << r.out;
  auto loss = testing::records_of(dir + "/lora/metrics.jsonl", "loss");
  ASSERT_EQ(loss.size(), 40u);
  EXPECT_LT(loss.back()["loss"].get<double>(), loss.front()["loss"].get<double>() - 0.1);
  // Resumed without its init_from (moved away): the checkpoint holds what it gave, and the run
  // goes on as the one resumed beside it.
  std::filesystem::copy(dir + "/lora", dir + "/with-base",
                        std::filesystem::copy_options::recursive);
  r = testing::run_lmforge(
      "train with-base/config.yaml --set run.dir=with-base --set train.steps=50 --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::filesystem::rename(dir + "/base", dir + "/base-away");
  r = testing::run_lmforge(lora + "--set train.steps=50 --resume", dir);
  std::filesystem::rename(dir + "/base-away", dir + "/base");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("note: init_from base cannot be read; resuming"), std::string::npos)
      << r.out;
  EXPECT_TRUE(testing::slurp(dir + "/lora/checkpoints/step-00000050/model.safetensors") ==
              testing::slurp(dir + "/with-base/checkpoints/step-00000050/model.safetensors"));
  EXPECT_EQ(testing::metric_by_step(dir + "/lora", "loss"),
            testing::metric_by_step(dir + "/with-base", "loss"));
  EXPECT_EQ(nlohmann::json::parse(
                testing::slurp(dir + "/lora/checkpoints/step-00000050/state.json"))["init_from"],
            "base");

  Safetensors base = Safetensors::open(dir + "/base/checkpoints/step-00000020/model.safetensors");
  Safetensors tuned = Safetensors::open(dir + "/lora/checkpoints/step-00000050/model.safetensors");
  int adapters = 0;
  for (const std::string& n : tuned.names()) {
    if (n.ends_with(".lora_a") || n.ends_with(".lora_b")) {
      ++adapters;
      continue;
    }
    ASSERT_TRUE(base.has(n)) << n;
    Tensor a = base.get(n), b = tuned.get(n);
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << n << " moved";
  }
  EXPECT_EQ(adapters, 2 * 4 * 4);  // A and B of qkv, proj, fc, down in 4 blocks
  Safetensors opt =
      Safetensors::open(dir + "/lora/checkpoints/step-00000050/optimizer.safetensors");
  EXPECT_EQ(opt.names().size(), 2u * adapters);  // m and v
  for (const std::string& n : opt.names()) EXPECT_NE(n.find(".lora_"), std::string::npos) << n;

  // Starting from the LoRA run with other adapters would drop the trained ones: refused.
  r = testing::run_lmforge("train --set init_from=lora --set model.lora_rank=0 " + data +
                               "--set train.steps=1 --set run.dir=again",
                           dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("holds LoRA adapters"), std::string::npos) << r.err;
  // Continuing them with Muon (whole matrices only): refused, though no model.lora_* is given.
  r = testing::run_lmforge("train --set init_from=lora --set train.optimizer=muon " + data +
                               "--set train.steps=1 --set run.dir=again",
                           dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.optimizer: muon"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("continues LoRA adapters"), std::string::npos) << r.err;

  r = testing::run_lmforge("export --checkpoint lora --to-hf hf", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  SafetensorsSet hf = SafetensorsSet::open(dir + "/hf");
  for (const std::string& n : hf.names()) EXPECT_EQ(n.find("lora"), std::string::npos) << n;
  // Sampling the LoRA run folds its adapters into the weights as the export does: the same
  // greedy text as the exported model's, in fp32 and in bf16.
  for (const char* p : {"fp32", "bf16"}) {
    const std::string flags = std::string(
                                  " --prompt 'In the' --temperature 0 --max-tokens 12 "
                                  "--ignore-eos --precision ") +
                              p;
    auto a = testing::run_lmforge("generate --checkpoint lora" + flags, dir);
    auto b = testing::run_lmforge("generate --checkpoint hf:hf" + flags, dir);
    ASSERT_EQ(a.exit_code, 0) << a.err;
    ASSERT_EQ(b.exit_code, 0) << b.err;
    EXPECT_EQ(a.out, b.out) << p;
  }

  // The adapters alone, as PEFT saves them (their values are checked against transformers in
  // test_hf_reference): GPT-2's four Conv1D layers per block, A and B each.
  r = testing::run_lmforge("export --checkpoint lora --to-peft adapter", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("base model: not a HF directory (init_from base)"), std::string::npos)
      << r.out;
  const auto cfg = nlohmann::json::parse(testing::slurp(dir + "/adapter/adapter_config.json"));
  EXPECT_EQ(cfg["r"], 8);
  EXPECT_EQ(cfg["fan_in_fan_out"], true);
  EXPECT_EQ(cfg["target_modules"],
            nlohmann::json({"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}));
  Safetensors adapter = Safetensors::open(dir + "/adapter/adapter_model.safetensors");
  EXPECT_EQ(adapter.names().size(), 2u * 4 * 4);
  EXPECT_TRUE(adapter.has("base_model.model.transformer.h.3.mlp.c_fc.lora_B.weight"));
  r = testing::run_lmforge("export --checkpoint base --to-peft adapter2", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("has no LoRA adapters"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir + "/adapter2"));
}

}  // namespace lmforge
