// lmforge plan (plan/planner.h): the activations a measuring model predicts are the bytes a real
// model plans; the command recommends the least communication that fits and refuses bad options.
// Its memory and traffic per strategy are checked against what training ranks report holding and
// what their communicator counted in tests/dist/test_data_parallel.cpp.
#include <gtest/gtest.h>

#include "lmforge/dist/data_parallel.h"
#include "lmforge/dist/tensor_parallel.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/block.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/plan/planner.h"
#include "testing/process.h"

namespace lmforge {
namespace {

// Transformer::MeasureOnly plans without allocating, and finds the bytes plan() allocates: per
// preset, precision, activation checkpointing and shape (LoRA's adapter activations too).
TEST(Planner, MeasuredActivationsAreWhatTheModelPlans) {
  for (const char* preset : {"gpt2-tiny", "llama3-tiny"})
    for (bool bf16 : {false, true})
      for (const char* recompute : {"none", "selective", "full"})
        for (int lora : {0, 4}) {
          ModelConfig c = model_preset(preset);
          c.lora.rank = lora;
          Transformer real(c), measured(c, Transformer::MeasureOnly{bf16});
          if (bf16) real.enable_bf16();
          for (auto [B, T] : {std::pair<int64_t, int64_t>{2, 16}, {3, 64}}) {
            real.plan(B, T, parse_recompute(recompute));
            measured.plan(B, T, parse_recompute(recompute));
            EXPECT_EQ(measured.activation_bytes(), real.activation_bytes())
                << preset << (bf16 ? " bf16 " : " fp32 ") << recompute << " lora " << lora
                << " B=" << B << " T=" << T;
          }
          // A frozen model's forwards (a DPO reference, a distillation teacher).
          Transformer frozen(c), measured_frozen(c, Transformer::MeasureOnly{bf16});
          if (bf16) frozen.enable_bf16();
          frozen.plan_forward_only(3, 64);
          measured_frozen.plan_forward_only(3, 64);
          EXPECT_EQ(measured_frozen.activation_bytes(), frozen.activation_bytes()) << preset;
          EXPECT_EQ(measured.params().flat_size(), real.params().flat_size()) << preset;
          EXPECT_FALSE(measured.params().has_values());
        }
}

// gpt2-tiny with this vocabulary at B=4, T=64.
// One step of llama3-tiny (V = 320, byte tokenizer) into dir/run: a checkpoint to plan from.
testing::RunResult train_llama_tiny(const std::string& dir, const std::string& run) {
  return testing::run_lmforge(
      "train --set model.preset=llama3-tiny --set data.tokenizer=byte --set model.vocab_size=320 "
      "--set train.steps=1 --set train.batch_size=1 --set train.seq_len=32 --set "
      "train.eval_every=0 --set sample.prompt= --set run.dir=" +
          dir + "/" + run,
      dir);
}

Config tiny_config(int64_t vocab) {
  Config cfg;
  cfg.model = model_preset("gpt2-tiny");
  cfg.model.vocab_size = vocab;
  cfg.train.batch_size = 4;
  cfg.train.seq_len = 64;
  return cfg;
}

TEST(Planner, RecommendsTheLeastTrafficThatFits) {
  Config cfg = tiny_config(512);
  PlanOptions o;
  o.ranks = 4;
  o.memory_bytes = 1e12;  // everything fits: no-shard sends the least
  Plan p = make_plan(cfg, o);
  // The four strategies, then tensor parallelism in groups of 2 and 4 (gpt2-tiny's 4 heads),
  // each without and with sequence parallelism; the 2 groups of 2 also with full-shard across
  // them.
  const char* const names[] = {"tp2", "tp2-fsdp", "tp2-sp", "tp2-sp-fsdp", "tp4", "tp4-sp"};
  ASSERT_EQ(p.strategies.size(), 10u);
  ASSERT_GE(p.recommended, 0);
  EXPECT_EQ(p.strategies[p.recommended].strategy, 0);
  EXPECT_EQ(p.strategies[p.recommended].tensor_parallel, 1);
  const std::string table = format_plan(p);
  for (int i = 4; i < 10; ++i) {
    const std::string n = names[i - 4];
    const int tp = n[2] - '0';
    const bool seq = n.find("-sp") != std::string::npos;
    const bool fsdp = n.find("-fsdp") != std::string::npos;
    const StrategyPlan& sp = p.strategies[i];
    EXPECT_EQ(sp.tensor_parallel, tp) << n;
    EXPECT_EQ(sp.sequence_parallel, seq) << n;
    EXPECT_NE(table.find("\n  " + n + " "), std::string::npos) << table;
    // A share's state under no-shard (or full-shard) across 4 / tp groups, and its partial sums'
    // traffic (a rank's 4 / tp rows under sequence parallelism).
    FootprintOptions fo;
    fo.strategy = static_cast<int>(fsdp ? dist::Strategy::kFullShard : dist::Strategy::kNoShard);
    EXPECT_EQ(sp.strategy, fo.strategy) << n;
    fo.shards = 4 / tp;
    // (the vocabulary split too)
    const ModelConfig share = dist::tensor_parallel_config(p.model, tp, true);
    EXPECT_DOUBLE_EQ(sp.state.total(), training_footprint(share, fo).total()) << n;
    EXPECT_DOUBLE_EQ(sp.sent_bytes,
                     step_traffic_bytes(share, fo, 4 / tp, 1) +
                         tensor_parallel_traffic_bytes(p.model, seq ? 4 / tp : 4, 64, tp, 1,
                                                       {.sequence_parallel = seq,
                                                        .data_shards = fsdp ? 4 / tp : 1,
                                                        .vocab_parallel = true}))
        << n;
    EXPECT_LT(sp.total(), p.strategies[0].total()) << n;
    // Full-shard across the groups holds less of the share, and sends more.
    if (fsdp) {
      EXPECT_LT(sp.state.total(), p.strategies[i - 1].state.total()) << n;
      EXPECT_GT(sp.sent_bytes, p.strategies[i - 1].sent_bytes) << n;
    }
  }
  // Sequence parallelism holds less outside attention and the MLP.
  EXPECT_LT(p.strategies[6].activations, p.strategies[4].activations);
  EXPECT_LT(p.strategies[9].activations, p.strategies[8].activations);
  // The share's activations are what its model plans (the branches fp32; its part of the
  // vocabulary's loss statistics).
  struct NoSums final : PartialSums {
    void sum(const Tensor&) const override {}
  } no_sums;
  Transformer share(dist::tensor_parallel_config(p.model, 2, /*vocab_parallel=*/true));
  share.set_bf16_matmul_outputs(false);
  share.set_vocab_parallel(&no_sums, 0, p.model.vocab_size, 2, true);
  share.plan(4, 64);
  EXPECT_DOUBLE_EQ(p.strategies[4].activations, static_cast<double>(share.activation_bytes()));
  // Less memory than no-shard's but more than full-shard's: the cheapest sharding that fits.
  const double no_shard = p.strategies[0].total(), full = p.strategies[3].total();
  ASSERT_LT(full, no_shard);
  o.memory_bytes = (no_shard + full) / 2;
  p = make_plan(cfg, o);
  ASSERT_GE(p.recommended, 0);
  EXPECT_TRUE(p.strategies[p.recommended].fits);
  EXPECT_FALSE(p.strategies[0].fits);
  // (per token: a tensor-parallel group trains 1/N of the tokens per step)
  for (const StrategyPlan& sp : p.strategies)
    if (sp.fits) {
      EXPECT_GE(
          sp.sent_bytes * sp.tensor_parallel,
          p.strategies[p.recommended].sent_bytes * p.strategies[p.recommended].tensor_parallel);
    }
  double least = full;  // nothing fits
  for (const StrategyPlan& sp : p.strategies) least = std::min(least, sp.total());
  o.memory_bytes = least / 2;
  p = make_plan(cfg, o);
  EXPECT_EQ(p.recommended, -1);
  EXPECT_NE(format_plan(p).find("none fits"), std::string::npos);
  // The time: tokens x FLOPs per token over the ranks' rate.
  o.tflops = 100;
  o.mfu = 0.5;
  p = make_plan(cfg, o);
  EXPECT_DOUBLE_EQ(p.seconds, p.tokens * p.flops_per_token / (4 * 100e12 * 0.5));
  EXPECT_DOUBLE_EQ(p.tokens, 4.0 * 64 * 4 * static_cast<double>(cfg.train.steps));
}

// Distillation: the teacher (train.teacher's architecture) is held as a reference is, its
// forward's activations beside the student's, its forward's FLOPs in the time.
TEST(Planner, CountsADistillationTeacher) {
  const std::string dir = testing::temp_dir("plan-teacher");
  const auto t = train_llama_tiny(dir, "teacher");
  ASSERT_EQ(t.exit_code, 0) << t.err;
  Config cfg = tiny_config(320);
  PlanOptions o;
  o.ranks = 2;
  o.tflops = 1;
  const Plan clm = make_plan(cfg, o);
  cfg.train.objective = "distill";
  cfg.train.teacher = dir + "/teacher";
  const Plan p = make_plan(cfg, o);
  ASSERT_EQ(p.strategies.size(), clm.strategies.size());
  ModelConfig teacher = model_preset("llama3-tiny");
  teacher.vocab_size = 320;
  Transformer forwards(teacher, Transformer::MeasureOnly{});
  forwards.plan_forward_only(4, 64);
  // no-shard: the whole teacher (fp32); full-shard: its shard and gather buffers
  EXPECT_EQ(p.strategies[0].state.reference, static_cast<double>(teacher.num_params()) * 4);
  FootprintOptions fo;  // (its shard's bytes checked against a run in test_data_parallel)
  fo.strategy = static_cast<int>(dist::Strategy::kFullShard);
  fo.shards = 2;
  fo.reference = true;
  fo.frozen = &teacher;
  EXPECT_EQ(p.strategies[3].state.reference, training_footprint(cfg.model, fo).reference);
  EXPECT_EQ(p.strategies[0].activations,
            clm.strategies[0].activations + static_cast<double>(forwards.activation_bytes()));
  EXPECT_GT(p.strategies[3].sent_bytes, clm.strategies[3].sent_bytes);  // its blocks gathered
  EXPECT_DOUBLE_EQ(p.flops_per_token,
                   clm.flops_per_token + teacher.flops_per_token(cfg.train.seq_len) / 3);
  EXPECT_DOUBLE_EQ(p.seconds, clm.seconds * p.flops_per_token / clm.flops_per_token);
  cfg.train.teacher = dir + "/missing";
  try {
    make_plan(cfg, o);
    ADD_FAILURE() << "a missing teacher was planned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.teacher: "), std::string::npos) << e.what();
  }
}

// DPO's and KTO's reference forwards (DPO's none when precomputed before training) and KTO's KL
// rows through the policy and the reference are forwards of the model's shape in every step's time.
TEST(Planner, CountsTheReferenceForwards) {
  Config cfg = tiny_config(320);
  PlanOptions o;
  o.tflops = 1;
  const Plan clm = make_plan(cfg, o);
  const double forward = cfg.model.flops_per_token(cfg.train.seq_len) / 3;
  auto flops = [&](const std::string& objective, bool precompute, const std::string& kto_loss) {
    Config c = cfg;
    c.train.objective = objective;
    c.train.precompute_ref_logps = precompute;
    c.train.kto_loss = kto_loss;
    const Plan p = make_plan(c, o);
    EXPECT_DOUBLE_EQ(p.seconds, clm.seconds * p.flops_per_token / clm.flops_per_token);
    return p.flops_per_token;
  };
  EXPECT_DOUBLE_EQ(flops("dpo", false, "kto"), clm.flops_per_token + forward);
  EXPECT_DOUBLE_EQ(flops("dpo", true, "kto"), clm.flops_per_token);
  EXPECT_DOUBLE_EQ(flops("orpo", false, "kto"), clm.flops_per_token);  // no reference
  EXPECT_DOUBLE_EQ(flops("kto", false, "kto"), clm.flops_per_token + 3 * forward);
  EXPECT_DOUBLE_EQ(flops("kto", false, "apo_zero_unpaired"), clm.flops_per_token + forward);
}

// init_from: the source's architecture is planned, as train adopts it (LoRA on top as given), not
// the config's model section; a model key that contradicts the source is refused as train does.
TEST(Planner, PlansTheInitFromSourcesModel) {
  const std::string dir = testing::temp_dir("plan-init");
  const auto t = train_llama_tiny(dir, "src");
  ASSERT_EQ(t.exit_code, 0) << t.err;
  ModelConfig src = model_preset("llama3-tiny");
  src.vocab_size = 320;
  Config cfg = tiny_config(512);  // a GPT-2 model section the source replaces
  cfg.init_from = dir + "/src";
  PlanOptions o;
  Plan p = make_plan(cfg, o);
  EXPECT_EQ(p.model.arch, "llama");
  EXPECT_EQ(p.params, static_cast<double>(src.num_params()));
  EXPECT_EQ(p.trained, static_cast<double>(src.num_params()));
  EXPECT_DOUBLE_EQ(p.flops_per_token, src.flops_per_token(cfg.train.seq_len));
  cfg.model.lora.rank = 4;
  cfg.keys_given.insert("model.lora_rank");
  p = make_plan(cfg, o);
  src.lora.rank = 4;
  EXPECT_EQ(p.trained, static_cast<double>(src.lora_params()));
  EXPECT_DOUBLE_EQ(p.flops_per_token, src.flops_per_token(cfg.train.seq_len));
  cfg.keys_given.insert("model.n_layer");  // gpt2-tiny's 4 layers: the source has as many
  cfg.model.n_layer = src.n_layer + 1;
  try {
    make_plan(cfg, o);
    ADD_FAILURE() << "a model key contradicting init_from was planned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_layer: "), std::string::npos) << e.what();
  }
}

TEST(Planner, CommandPrintsThePlanAndRefusesBadOptions) {
  const std::string dir = testing::temp_dir("plan");
  auto r = testing::run_lmforge(
      "plan --set model.preset=gpt2-tiny --set data.tokenizer=byte --ranks 2 --memory-gib 4 "
      "--tflops 1",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* want :
       {"model: ", "V=320", "full-shard", "recommended: dist.strategy: no-shard", "time: "})
    EXPECT_NE(r.out.find(want), std::string::npos) << want << "\n" << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir + "/runs")) << "plan writes nothing";
  testing::RunResult bad = testing::run_lmforge("plan --ranks 0", dir);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("--ranks"), std::string::npos) << bad.err;
  bad = testing::run_lmforge("plan --ranks 8 --ranks-per-node 3", dir);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("--ranks-per-node: 3 does not divide"), std::string::npos) << bad.err;
  bad = testing::run_lmforge("plan --set train.seq_len=4096", dir);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("train.seq_len"), std::string::npos) << bad.err;
  // What train refuses from the config alone, plan refuses with train's message (each checked
  // against `train` too: the same first line).
  const std::string tiny = "--set model.preset=gpt2-tiny --set data.tokenizer=byte ";
  for (const auto& [set, want] : std::vector<std::pair<std::string, std::string>>{
           {"--set model.vocab_size=256", "model.vocab_size: 256 is smaller than the tokenizer's"},
           {"--set data.tokenizer=bpe:100", "expected bpe:N with N >= 257"},
           {"--set train.patience=2 --set train.eval_every=0", "train.patience"},
           {"--set data.val_fraction=1.5", "data.val_fraction"},
           {"--set data.packing=bogus", "data.packing"}}) {
    for (const char* cmd : {"plan ", "train "}) {
      bad = testing::run_lmforge(cmd + tiny + set, dir);
      EXPECT_EQ(bad.exit_code, 1) << cmd << set << "\n" << bad.out;
      EXPECT_NE(bad.err.find(want), std::string::npos) << cmd << set << "\n" << bad.err;
    }
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/runs")) << "nothing trained";
  // With model.vocab_size set, a tokenizer that is not on this machine (a cluster's path) is no
  // error: the run is planned all the same.
  auto plan_v32000 = [&](const std::string& tokenizer) {
    return testing::run_lmforge(
        "plan --set model.preset=gpt2-tiny --set model.vocab_size=32000 --set data.tokenizer=" +
            tokenizer,
        dir);
  };
  r = plan_v32000("/nonexistent/tokenizer.model");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("V=32000"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("is not here"), std::string::npos) << r.err;
  // ... but one that is here must load.
  std::ofstream(dir + "/broken.json") << "{\"model\": ";
  r = plan_v32000("broken.json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.err.find("broken.json"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace lmforge
