// Data parallelism over MPI ranks (dist/dp_test.h): every strategy against one process that sees
// the same global batch (batch B with grad_accum N, the rows rank r would take as micro-batch r);
// LoRA, Muon and DPO/KTO under every strategy; sharded memory is 1/N and fits the node's memory
// check; hybrid as 2 nodes x 2; bf16 and bf16 master weights; a checkpoint saved by 4 ranks
// resumes on 2 and 1; and a rank that dies or hangs stops the job naming it.
#include "dist/dp_test.h"

namespace lmforge {
namespace {

using testing::RunResult;

TEST_F(DataParallelTest, EveryStrategyMatchesOneProcessWithTheSameGlobalBatch) {
  for (int n : {2, 4}) {
    const std::string& ref = reference(n);
    RunResult one =
        run("single-" + std::to_string(n), 1,
            "--set train.batch_size=2 --set dist.strategy=zero1 --set train.grad_accum=" +
                std::to_string(n));
    ASSERT_EQ(one.exit_code, 0) << one.err;
    const double full_opt = memory(one.out).first, full_params = memory(one.out).second;
    for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
      std::string name = s + "-" + std::to_string(n);
      RunResult r = run(name, n, "--set train.batch_size=2 --set dist.strategy=" + s);
      ASSERT_EQ(r.exit_code, 0) << name << "\n" << r.out << r.err;
      expect_same(name, ref);
      auto [opt, par] = memory(r.out);
      if (s != "no-shard")  // optimizer state is 1/N (+-1%)
        EXPECT_NEAR(opt / full_opt, 1.0 / n, 0.01 / n) << name;
      else
        EXPECT_EQ(opt, full_opt);
      if (s == "full-shard")
        EXPECT_NEAR(par / full_params, 1.0 / n, 0.01 / n) << name;
      else
        EXPECT_EQ(par, full_params);
      // The memory check's prediction (training_footprint) of what the rank holds.
      if (n == 2) expect_footprint(r.out, s, n, name);
      // Communication volume, as the communicator counted it, against the theory.
      const double expect = traffic_in_theory(s, n, name);
      const std::vector<double> mib = losses(name, "comm_mib");
      ASSERT_EQ(mib.size(), 6u) << name;
      for (double v : mib) EXPECT_NEAR(v * 1048576.0, expect, 1e-9 * expect) << name;
      // lmforge plan's prediction (without the layout's alignment gaps).
      expect_planned_traffic(name, s, n, 1, mib[0]);
      std::printf("%s: %.4f MiB per step and rank, %.4f in theory\n", name.c_str(), mib[0],
                  expect / 1048576.0);
    }
  }
}

// LoRA (model.lora_rank) under every strategy: the adapters' gradients reduce, shard and update
// as one process's with the same global batch, and the frozen weights get no optimizer state.
// Every strategy sends the adapters' gradients (and their updated values) alone; full-shard also
// gathers the frozen weights for the forward and backward.
TEST_F(DataParallelTest, LoraOnEveryStrategyMatchesOneProcess) {
  const std::string lora = "--set model.lora_rank=4 --set train.batch_size=2 ";
  // zero1 on one process is no-shard, and reports its memory.
  RunResult ref = run("lora-ref", 1, lora + "--set train.grad_accum=2 --set dist.strategy=zero1");
  ASSERT_EQ(ref.exit_code, 0) << ref.err;
  const double ref_opt = memory(ref.out).first;
  // The adapters' bytes in fp32 (4 blocks x 4 layers x r (in + out) elements).
  const double adapters = 4.0 * 4 * 4 * (128 + 384 + 128 + 128 + 128 + 512 + 512 + 128);
  for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
    RunResult r = run("lora-" + s, 2, lora + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << s << "\n" << r.out << r.err;
    expect_same("lora-" + s, "lora-ref");
    EXPECT_LE(memory(r.out).first, ref_opt) << s;
    // Gradients: the adapters' alone (every buffer packs the trained elements: the model's, and
    // under grad-/full-shard the shard and the block workspaces, which held the whole model's
    // 1/N and its largest block). The planner gives the rank holding the most adapters; rank 0,
    // whose range begins with the embeddings, holds fewer.
    if (s == "no-shard") {
      expect_footprint(r.out, s, 2, "lora-" + s);
    } else {
      std::smatch m;
      ASSERT_TRUE(std::regex_search(r.out, m, std::regex("gradients (\\d+) bytes"))) << r.out;
      const double held = std::stod(m[1]);
      FootprintOptions o;
      o.strategy = static_cast<int>(dist::parse_strategy(s));
      o.shards = 2;
      const double planned =
          training_footprint(checkpoint_model_config(find_latest_checkpoint(*dir_ + "/lora-" + s)),
                             o)
              .gradients;
      EXPECT_LE(held, planned + 1024) << s;  // (+ the runs' 64-byte alignment)
      // zero1: the model's packed buffer; grad-/full-shard: a shard of it and two blocks' worth
      EXPECT_LE(held, (s == "zero1" ? 1.0 : 1.5) * adapters + 1024) << s;
      EXPECT_GE(held, (s == "zero1" ? 1.0 : 0.5) * adapters) << s;
    }
    // A step skipped for a non-finite gradient leaves the next ones alone (the frozen weights'
    // part of a gradient shard is never sent, so it must stay zero, not NaN).
    if (s == "grad-shard" || s == "full-shard") {
      RunResult f = run("lora-nan-" + s, 2,
                        lora + "--set dist.strategy=" + s + " --set train.inject_fault=nan@2");
      ASSERT_EQ(f.exit_code, 0) << s << "\n" << f.err;
      EXPECT_EQ(testing::records_of(*dir_ + "/lora-nan-" + s + "/metrics.jsonl", "skipped").size(),
                1u)
          << s;
    }
    const double factor = s == "zero1" ? 1.5 : 1.0;  // 2 ranks: k = 1/2
    const double expect = traffic_in_theory(s, 2, "lora-" + s);
    if (s != "full-shard") {
      EXPECT_EQ(expect, factor * adapters) << s;
    }
    const std::vector<double> mib = losses("lora-" + s, "comm_mib");
    ASSERT_FALSE(mib.empty()) << s;
    for (double v : mib) EXPECT_NEAR(v * 1048576.0, expect, 1e-9 * expect) << s;
  }
  // AdamW state: two moments of the adapters only (4 blocks x 4 layers x r (in + out)).
  EXPECT_EQ(ref_opt, 8.0 * 4 * 4 * (128 + 384 + 128 + 128 + 128 + 512 + 512 + 128));
}

// LoRA under bf16 master weights: the adapters' fp32 masters live in AdamW's state, sharded with it
// (zero1, full-shard: each rank's pieces, saved in its own file as w.<name> slices; the runs are
// one process's) and gathered whole into the checkpoint under tensor parallelism; every run
// resumes bit for bit (a tensor-parallel checkpoint also in one process, within bf16's
// roundings).
TEST_F(DataParallelTest, LoraWithBf16MasterWeightsShardsTheAdaptersMasters) {
  const std::string lora =
      "--set model.lora_rank=4 --set train.batch_size=2 --set train.precision=bf16 "
      "--set train.master_weights=bf16 --set train.checkpoint_every=3 --set train.keep_last=0 ";
  // (zero1 on one process is no-shard, and reports its memory)
  RunResult ref = run("lora16-ref", 1, lora + "--set train.grad_accum=2 --set dist.strategy=zero1");
  ASSERT_EQ(ref.exit_code, 0) << ref.err;
  // AdamW's state: two moments and a master per adapter element (4 blocks x 4 layers x r (in +
  // out)), as the planner counts it.
  const double adapters = 4.0 * 4 * (128 + 384 + 128 + 128 + 128 + 512 + 512 + 128);
  EXPECT_EQ(memory(ref.out).first, 12 * adapters);
  FootprintOptions fo;
  fo.bf16 = fo.bf16_master = true;
  EXPECT_EQ(
      training_footprint(checkpoint_model_config(find_latest_checkpoint(*dir_ + "/lora16-ref")), fo)
          .optimizer,
      12 * adapters);
  // Every adapter's master is saved (4 blocks x 4 layers x A and B), by one file or another.
  auto masters_saved = [&](const std::string& name, const std::vector<std::string>& files) {
    std::set<std::string> seen;
    for (const std::string& f : files)
      for (const std::string& n :
           Safetensors::open(*dir_ + "/" + name + "/checkpoints/step-00000003/" + f).names())
        if (n.starts_with("w.")) {
          EXPECT_TRUE(n.ends_with(".lora_a") || n.ends_with(".lora_b")) << n;
          seen.insert(n);
        }
    EXPECT_EQ(seen.size(), 32u) << name;
  };
  masters_saved("lora16-ref", {"optimizer-rank-00000-of-00001.safetensors"});
  for (std::string s : {"zero1", "full-shard"}) {
    const std::string name = "lora16-" + s, with = lora + "--set dist.strategy=" + s + " ";
    RunResult r = run(name, 2, with);
    ASSERT_EQ(r.exit_code, 0) << s << "\n" << r.out << r.err;
    expect_same(name, "lora16-ref", 1e-5, 1e-5, 1e-4);
    masters_saved(name, {"optimizer-rank-00000-of-00002.safetensors",
                         "optimizer-rank-00001-of-00002.safetensors"});
    RunResult again = run(name + "-resume", 2,
                          with + "--resume=" + *dir_ + "/" + name + "/checkpoints/step-00000003");
    ASSERT_EQ(again.exit_code, 0) << s << "\n" << again.out << again.err;
    expect_resumed(name + "-resume", name);
    // Resumed with fp32 master weights, the adapters' values are the saved masters (the shard each
    // rank updates; full-shard's value shards): the same steps, the adapters ending as the bf16
    // run's masters (its values their nearest bf16).
    RunResult fp32 = run(name + "-resume-fp32", 2,
                         with + "--set train.master_weights=fp32 --resume=" + *dir_ + "/" + name +
                             "/checkpoints/step-00000003");
    ASSERT_EQ(fp32.exit_code, 0) << s << "\n" << fp32.out << fp32.err;
    const std::vector<double> all = losses(name), rest = losses(name + "-resume-fp32");
    ASSERT_EQ(rest.size(), 3u);
    for (size_t i = 0; i < 3; ++i) EXPECT_EQ(rest[i], all[3 + i]) << s << ", step " << 4 + i;
    const std::vector<float> p = params(name + "-resume-fp32"), q = params(name);
    ASSERT_EQ(p.size(), q.size());
    size_t rounded = 0;
    for (size_t i = 0; i < p.size(); ++i) {
      ASSERT_EQ(bf16_to_fp32(fp32_to_bf16_ftz(p[i])), q[i]) << s << ", element " << i;
      rounded += p[i] != q[i];
    }
    EXPECT_GT(rounded, 0u) << "the adapters kept fp32 values";
  }
  const std::string tp = lora + "--set dist.tensor_parallel=2 ";
  RunResult t = run("lora16-tp", 2, tp);
  ASSERT_EQ(t.exit_code, 0) << t.out << t.err;
  masters_saved("lora16-tp", {"optimizer.safetensors"});
  const std::string ckpt = " --resume=" + *dir_ + "/lora16-tp/checkpoints/step-00000003";
  RunResult tr = run("lora16-tp-resume", 2, tp + ckpt);
  ASSERT_EQ(tr.exit_code, 0) << tr.out << tr.err;
  expect_resumed("lora16-tp-resume", "lora16-tp");
  // One process goes on from the group's checkpoint as the group does, within bf16's roundings
  // (TP's partial sums stay fp32; masters read wrong, or widened from the values, would move the
  // adapters' updates by more).
  RunResult one = run("lora16-tp-resume-1", 1, lora + ckpt);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  expect_resumed("lora16-tp-resume-1", "lora16-tp", 1e-3);
}

// Muon (train.optimizer: muon) under every strategy: under DDP every rank orthogonalizes the same
// all-reduced gradients; with sharded state each rank updates its pieces of the momentum, gathers
// each matrix's update direction whole, orthogonalizes the matrices it holds a piece of and
// updates its pieces (Moonlight's distributed Muon). Either way one process's steps with the same
// global batch.
TEST_F(DataParallelTest, MuonUnderEveryStrategyMatchesOneProcess) {
  const std::string muon = "--set train.optimizer=muon --set train.batch_size=2 ";
  RunResult ref = run("muon-ref", 1, muon + "--set train.grad_accum=2");
  ASSERT_EQ(ref.exit_code, 0) << ref.err;
  for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
    const std::string name = "muon-" + s;
    RunResult r = run(name, 2, muon + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    expect_same(name, "muon-ref");
    // One moment for the blocks' matrices (1/N of it when sharded), and the Newton-Schulz
    // workspace; the traffic with the directions' gathers: as predicted.
    expect_footprint(r.out, s, 2, name, /*muon=*/true);
    const std::vector<double> mib = losses(name, "comm_mib");
    ASSERT_FALSE(mib.empty()) << name;
    expect_planned_traffic(name, s, 2, 1, mib[0], 0, /*muon=*/true);
  }
  RunResult ref4 = run("muon-ref4", 1, muon + "--set train.grad_accum=4");
  ASSERT_EQ(ref4.exit_code, 0) << ref4.err;
  RunResult h =
      run("muon-hybrid", 4, muon + "--set dist.strategy=hybrid --set dist.ranks_per_node=2");
  ASSERT_EQ(h.exit_code, 0) << h.out << h.err;
  expect_same("muon-hybrid", "muon-ref4");

  // A sharded checkpoint of Muon's momentum pieces resumes bit-exactly, and in one process.
  RunResult c = run("muon-ckpt", 2,
                    muon +
                        "--set dist.strategy=full-shard --set train.checkpoint_every=3 --set "
                        "train.keep_last=0");
  ASSERT_EQ(c.exit_code, 0) << c.out << c.err;
  const std::string ckpt = *dir_ + "/muon-ckpt/checkpoints/step-00000003";
  RunResult again = run("muon-resume", 2, muon + "--set dist.strategy=full-shard --resume=" + ckpt);
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  expect_resumed("muon-resume", "muon-ckpt");
  RunResult one = run("muon-resume-1", 1, muon + "--set train.grad_accum=2 --resume=" + ckpt);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  expect_resumed("muon-resume-1", "muon-ckpt", 1e-5);

  // Tensor parallelism: each matrix's update direction assembled whole over the group (Muon
  // orthogonalizes the whole model's matrices), orthogonalized by one rank of the group in turn
  // and broadcast, each rank applying its share of the result; the gathers and broadcasts counted
  // in tp_comm_mib as lmforge plan counts them.
  RunResult one1 = run("muon-ref1", 1, muon);
  ASSERT_EQ(one1.exit_code, 0) << one1.err;
  RunResult t = run("muon-tp2", 2, muon + "--set dist.tensor_parallel=2");
  ASSERT_EQ(t.exit_code, 0) << t.out << t.err;
  expect_same("muon-tp2", "muon-ref1");
  expect_footprint(t.out, "no-shard", 1, "muon-tp2", /*muon=*/true, 2);
  const ModelConfig mc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/muon-tp2"));
  double matrices = 0;  // the whole model's Muon matrices, in elements
  const Transformer layout(mc, Transformer::MeasureOnly{});
  for (const Param& p : layout.params().params())
    if (muon_param(p)) matrices += static_cast<double>(p.shape.numel());
  const double planned = tensor_parallel_traffic_bytes(
      mc, 2, 32, 2, 1, {.vocab_parallel = true, .muon_elements = matrices});
  const std::vector<double> mib = losses("muon-tp2", "tp_comm_mib");
  ASSERT_EQ(mib.size(), 6u);
  for (double m : mib) EXPECT_DOUBLE_EQ(m * 1048576.0, planned);
  // A group of 4: each rank orthogonalizes every fourth matrix (the owners rotating by round),
  // receiving the other three ranks' results in turn.
  RunResult t4 = run("muon-tp4", 4, muon + "--set dist.tensor_parallel=4");
  ASSERT_EQ(t4.exit_code, 0) << t4.out << t4.err;
  expect_same("muon-tp4", "muon-ref1");
  for (double m : losses("muon-tp4", "tp_comm_mib"))
    EXPECT_DOUBLE_EQ(m * 1048576.0,
                     tensor_parallel_traffic_bytes(
                         mc, 2, 32, 4, 1, {.vocab_parallel = true, .muon_elements = matrices}));
  // 2 groups with full-shard across them (the pieces first whole over each share's ranks): a
  // checkpoint (no second moments for the matrices) resumes bit-exactly.
  const std::string tpf = muon + "--set dist.tensor_parallel=2 --set dist.strategy=full-shard ";
  RunResult f =
      run("muon-tp2-fsdp", 4, tpf + "--set train.checkpoint_every=3 --set train.keep_last=0");
  ASSERT_EQ(f.exit_code, 0) << f.out << f.err;
  expect_same("muon-tp2-fsdp", "muon-ref");
  RunResult fr = run("muon-tp2-fsdp-resume", 4,
                     tpf + "--resume=" + *dir_ + "/muon-tp2-fsdp/checkpoints/step-00000003");
  ASSERT_EQ(fr.exit_code, 0) << fr.out << fr.err;
  expect_resumed("muon-tp2-fsdp-resume", "muon-tp2-fsdp");
}

// Validation is split as training is: train.eval_batches global batches (batch_size x ranks rows
// each), every rank scoring its rows and the sums taken over the ranks, so N ranks of batch B
// score the rows one process of batch N·B does (the same val_loss, as the training losses), under
// a sharded model too (every rank runs every forward), and for DPO's rewards.
TEST_F(DataParallelTest, ValidationScoresTheRowsOfOneProcessWithTheSameGlobalBatch) {
  const std::string eval =
      "--set train.steps=3 --set train.eval_every=3 --set train.eval_batches=3 ";
  prepare_preferences("val-prefs", /*labelled=*/false);
  const std::string dpo =
      "--set train.objective=dpo --set train.dpo_beta=0.5 --set data.text= --set "
      "data.tokenizer=byte --set model.vocab_size=0 --set data.train=val-prefs/data "
      "--set data.val=val-prefs/data/train-*.bin ";
  for (const auto& [name, args] :
       {std::pair<std::string, std::string>{"val", eval}, {"val-dpo", eval + dpo}}) {
    RunResult one = run(name + "-one", 1, args + "--set train.batch_size=4");
    ASSERT_EQ(one.exit_code, 0) << one.out << one.err;
    for (std::string s : {"no-shard", "full-shard"}) {
      const std::string run_name = name + "-" + s;
      RunResult r = run(run_name, 2, args + "--set train.batch_size=2 --set dist.strategy=" + s);
      ASSERT_EQ(r.exit_code, 0) << run_name << "\n" << r.out << r.err;
      for (const char* key : {"val_loss", "val_reward_margin"}) {
        const std::vector<double> a = losses(run_name, key), b = losses(name + "-one", key);
        if (std::string(key) == "val_reward_margin" && name == "val") continue;
        ASSERT_EQ(a.size(), 1u) << run_name << " " << key;
        ASSERT_EQ(b.size(), 1u) << run_name << " " << key;
        EXPECT_NEAR(a[0], b[0], 1e-5 * std::abs(b[0]) + 1e-7) << run_name << " " << key;
      }
    }
  }
}

// DPO (train/objective.h) under every strategy (and KTO under tensor parallelism): its reference
// model's forward, the per-pair normalization over ranks and micro-batches and the per-row gradient
// weights give one process's step with the same global batch; so do precomputed reference
// log-likelihoods.
TEST_F(DataParallelTest, DpoOnEveryStrategyMatchesOneProcess) {
  prepare_preferences("prefs", /*labelled=*/false);
  const std::string dpo =
      "--set train.objective=dpo --set train.dpo_beta=0.5 --set data.text= --set "
      "data.tokenizer=byte "
      "--set model.vocab_size=0 --set data.train=prefs/data --set train.batch_size=2 ";
  RunResult ref = run("dpo-ref", 1, dpo + "--set train.grad_accum=2");
  ASSERT_EQ(ref.exit_code, 0) << ref.out << ref.err;
  for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
    RunResult r = run("dpo-" + s, 2, dpo + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << s << "\n" << r.out << r.err;
    // (this DPO saturates, its loss ~9e-5 by step 4: the loss's relative rounding there is the
    // margin's absolute one, ~1e-6 with AVX2's matmuls (Zen 3); a wrong shard moves it by ~1e-1)
    expect_same("dpo-" + s, "dpo-ref", kSaturatedDpo, kSaturatedDpo);
    if (s != "full-shard") continue;
    // Full-shard shards the reference as the policy: each rank holds half its values (+ its own
    // gather buffers), each block gathered for its forwards.
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.out, m,
                                  std::regex("reference model ([0-9.]+) MiB of weights: a shard of "
                                             "([0-9.]+) MiB \\(\\+ ([0-9.]+) MiB of gather")))
        << r.out;
    EXPECT_NEAR(std::stod(m[2]), std::stod(m[1]) / 2, 0.01) << m[0];
    // ... as the memory check predicts it (training_footprint's reference).
    FootprintOptions fo;
    fo.strategy = static_cast<int>(dist::Strategy::kFullShard);
    fo.shards = 2;
    fo.reference = true;
    const double predicted =
        training_footprint(checkpoint_model_config(find_latest_checkpoint(*dir_ + "/dpo-" + s)), fo)
            .reference /
        1048576.0;
    EXPECT_NEAR(predicted, std::stod(m[2]) + std::stod(m[3]), 0.02 * predicted) << m[0];
    // Its gathers join the step's traffic (from step 2: the first also gathers its embeddings
    // and head, kept since), as lmforge plan counts them.
    const std::vector<double> mib = losses("dpo-" + s, "comm_mib");
    ASSERT_EQ(mib.size(), 6u);
    for (size_t i = 1; i < mib.size(); ++i)
      expect_planned_traffic("dpo-" + s, s, 2, 1, mib[i], 0, false, /*reference_forwards=*/1);
  }
  // The reference's log-likelihoods precomputed (each rank half the batches, summed over ranks)
  // and the reference released: the same steps.
  RunResult r = run("dpo-pre", 2,
                    dpo + "--set dist.strategy=full-shard --set train.precompute_ref_logps=true");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("reference model ("), std::string::npos) << r.out;
  expect_same("dpo-pre", "dpo-ref", kSaturatedDpo, kSaturatedDpo);
  // Under LoRA the reference is the policy with its adapters off: precomputed from its whole
  // values before the full-shard ranks shard them (not from a buffer left to the shards).
  const std::string lora = dpo + "--set model.lora_rank=4 --set train.lr=1e-2 ";
  RunResult lr = run("dpo-lora-ref", 1, lora + "--set train.grad_accum=2");
  ASSERT_EQ(lr.exit_code, 0) << lr.out << lr.err;
  RunResult lp = run("dpo-lora-pre", 2,
                     lora + "--set dist.strategy=full-shard --set train.precompute_ref_logps=true");
  ASSERT_EQ(lp.exit_code, 0) << lp.out << lp.err;
  expect_same("dpo-lora-pre", "dpo-lora-ref");
  // Tensor parallelism: the reference split like the policy (its own partial sums over the same
  // group); 2 groups of 2, with the reference in the steps and precomputed (the groups split the
  // pairs, a group's ranks score the same ones). Its partial sums round the log-likelihoods
  // differently from one process (~1e-7), and DPO's loss, a sigmoid of their small differences,
  // magnifies that: measured up to 7e-6 relative in the losses and 2e-5 in the gradient norms
  // once the sigmoid saturates (steps 3 on, norms ~5e-3; a wrong share or a missing sum moves
  // them by far more, from step 1), so both get 1e-4. (Precomputed under full-shard across the
  // groups.)
  for (const char* pre : {"false", "true"}) {
    const std::string name = std::string("dpo-tp2-pre-") + pre;
    RunResult t = run(name, 4,
                      dpo + "--set dist.tensor_parallel=2 --set train.precompute_ref_logps=" + pre +
                          (pre[0] == 't' ? " --set dist.strategy=full-shard" : ""));
    ASSERT_EQ(t.exit_code, 0) << name << "\n" << t.out << t.err;
    expect_same(name, "dpo-ref", 1e-4, 1e-4);
    // The partial sums of the step and, unless precomputed, of the reference's forward.
    const ModelConfig c = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/" + name));
    const double planned = tensor_parallel_traffic_bytes(
        c, 2, 32, 2, 1,
        {.extra_forwards = pre[0] == 't' ? 0 : 1, .vocab_parallel = true, .rows_weighed = true});
    const std::vector<double> mib = losses(name, "tp_comm_mib");
    ASSERT_EQ(mib.size(), 6u) << name;
    for (double m : mib) EXPECT_DOUBLE_EQ(m * 1048576.0, planned);
  }
  // KTO likewise: its KL rows through the policy and the reference, and its batch through the
  // reference, each a forward of partial sums besides the step's.
  prepare_preferences("labelled", /*labelled=*/true);
  const std::string kto =
      "--set train.objective=kto --set data.text= --set data.tokenizer=byte --set "
      "model.vocab_size=0 --set data.train=labelled/data --set train.batch_size=2 ";
  RunResult ko = run("kto-ref", 1, kto);
  ASSERT_EQ(ko.exit_code, 0) << ko.out << ko.err;
  // Full-shard: the reference sharded, scoring the batch and the KL rows (2 forwards a
  // micro-batch, and the policy's of the KL rows); 2 ranks against one process's 2 micro-batches
  // (each rank's KL rows from its own micro-batch).
  RunResult ka = run("kto-ref-accum", 1, kto + "--set train.grad_accum=2");
  ASSERT_EQ(ka.exit_code, 0) << ka.out << ka.err;
  RunResult kf = run("kto-full-shard", 2, kto + "--set dist.strategy=full-shard");
  ASSERT_EQ(kf.exit_code, 0) << kf.out << kf.err;
  expect_same("kto-full-shard", "kto-ref-accum");
  {
    const std::vector<double> mib = losses("kto-full-shard", "comm_mib");
    ASSERT_EQ(mib.size(), 6u);
    for (size_t i = 1; i < mib.size(); ++i)
      expect_planned_traffic("kto-full-shard", "full-shard", 2, 1, mib[i], 0, false, 2, 1);
  }
  RunResult kt = run("kto-tp2", 2, kto + "--set dist.tensor_parallel=2");
  ASSERT_EQ(kt.exit_code, 0) << kt.out << kt.err;
  expect_same("kto-tp2", "kto-ref", 1e-4, 1e-4);
  const ModelConfig kc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/kto-tp2"));
  const double planned = tensor_parallel_traffic_bytes(
      kc, 2, 32, 2, 1, {.extra_forwards = 3, .vocab_parallel = true, .rows_weighed = true});
  const std::vector<double> kmib = losses("kto-tp2", "tp_comm_mib");
  ASSERT_EQ(kmib.size(), 6u);
  for (double m : kmib) EXPECT_DOUBLE_EQ(m * 1048576.0, planned);
}

// Ranks on one CPU node share its memory: a model whose training state (training_footprint: the
// rank's shards under zero1, grad-shard and full-shard) cannot fit them all is one clear error on
// every rank before any allocation, under every strategy.
// Distillation's teacher made as DPO's reference is: under full-shard (and hybrid) each rank
// holds its shard, each block gathered for its forward; under tensor parallelism with full-shard
// across the groups, its share's shard (and its vocabulary split with the student's). The same
// steps as one process with the same global batch.
TEST_F(DataParallelTest, DistillationWithAShardedTeacherMatchesOneProcess) {
  const std::string& teacher = reference(1);  // a trained gpt2-tiny run
  const std::string distill =
      "--set train.batch_size=2 --set model.n_layer=2 --set "
      "train.objective=distill --set train.teacher=" +
      *dir_ + "/" + teacher + " ";
  RunResult ref = run("distill-ref", 1, distill + "--set train.grad_accum=2");
  ASSERT_EQ(ref.exit_code, 0) << ref.out << ref.err;
  const ModelConfig whole = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/distill-ref"));
  const ModelConfig teacher_whole =
      checkpoint_model_config(find_latest_checkpoint(*dir_ + "/" + teacher));
  // What the memory check and lmforge plan predict for a rank's teacher (its share with tp > 1),
  // and for the traffic of its forwards: each step's (from step 2: the first also gathers its
  // embeddings and head, kept since) as the run measured it.
  auto as_planned = [&](const std::string& name, const std::string& out, int tp,
                        bool bf16 = false) {
    std::smatch m;
    ASSERT_TRUE(std::regex_search(out, m,
                                  std::regex("distill from .*, ([0-9.]+) MiB of weights.*: a "
                                             "shard of ([0-9.]+) MiB \\(\\+ ([0-9.]+) MiB")))
        << out;
    EXPECT_NEAR(std::stod(m[2]), std::stod(m[1]) / 2, 0.01) << m[0];
    const ModelConfig share = dist::tensor_parallel_config(whole, tp, tp > 1),
                      teacher_share = dist::tensor_parallel_config(teacher_whole, tp, tp > 1);
    FootprintOptions fo;
    fo.strategy = static_cast<int>(dist::Strategy::kFullShard);
    fo.shards = 2;
    fo.reference = true;
    fo.reference_forwards = 1;
    fo.frozen = &teacher_share;
    fo.tensor_parallel = tp;
    fo.bf16 = fo.frozen_bf16 = bf16;  // (under bf16 the teacher is held in bf16 alone)
    const double predicted = training_footprint(share, fo).reference / 1048576.0;
    EXPECT_NEAR(predicted, std::stod(m[2]) + std::stod(m[3]), 0.02 * predicted) << m[0];
    const std::vector<double> mib = losses(name, "comm_mib");
    ASSERT_EQ(mib.size(), 6u);
    const double planned = step_traffic_bytes(share, fo, 2, 1);
    for (size_t i = 1; i < mib.size(); ++i)
      EXPECT_NEAR(mib[i] * 1048576.0, planned, 0.005 * planned) << name << " step " << i + 1;
    if (tp == 1) return;
    // The group's partial sums: the student's and the teacher's, and both models' loss
    // statistics (40 bytes a row).
    const double tp_planned = tensor_parallel_traffic_bytes(
        whole, 2, 32, tp, 1, {.vocab_parallel = true, .teacher = &teacher_whole});
    for (double got : losses(name, "tp_comm_mib"))
      EXPECT_DOUBLE_EQ(got * 1048576.0, tp_planned) << name;
  };
  for (const char* s : {"full-shard", "hybrid"}) {
    const std::string name = std::string("distill-") + s;
    RunResult r = run(name, 2, distill + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    expect_same(name, "distill-ref");
    as_planned(name, r.out, 1);
    // (the KL term, as one process's)
    const std::vector<double> a = losses(name, "kl"), b = losses("distill-ref", "kl");
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5 * b[i]) << s << " kl " << i;
  }
  // bf16: the teacher held in bf16 alone (a third of its memory), its shards and gathers bf16,
  // the same steps as 2 ranks of DDP whose teacher is rounded to bf16 at load.
  const std::string bf16 = distill + "--set train.precision=bf16 ";
  RunResult d = run("distill-ddp-bf16", 2, bf16);
  ASSERT_EQ(d.exit_code, 0) << d.out << d.err;
  EXPECT_NE(
      d.out.find(fmt::format("{:.2f} MiB of weights", teacher_whole.num_params() * 2 / 1048576.0)),
      std::string::npos)
      << d.out;
  RunResult fb = run("distill-full-shard-bf16", 2, bf16 + "--set dist.strategy=full-shard");
  ASSERT_EQ(fb.exit_code, 0) << fb.out << fb.err;
  expect_same("distill-full-shard-bf16", "distill-ddp-bf16");
  as_planned("distill-full-shard-bf16", fb.out, 1, /*bf16=*/true);
  // 2 groups of 2: each rank's share of the teacher (half its blocks' weights and vocabulary),
  // sharded over the 2 ranks holding the same share.
  RunResult r = run("distill-tp2-fsdp", 4,
                    distill + "--set dist.tensor_parallel=2 --set dist.strategy=full-shard");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("(this rank's 1/2 share)"), std::string::npos) << r.out;
  expect_same("distill-tp2-fsdp", "distill-ref");
  as_planned("distill-tp2-fsdp", r.out, 2);
}

TEST_F(DataParallelTest, TrainingStateThatCannotFitTheNodesRanksIsRefused) {
  for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
    RunResult r = run("oom-" + s, 2,
                      "--set model.n_embd=65536 --set model.n_head=64 --set model.n_layer=64 "
                      "--set dist.strategy=" +
                          s);
    EXPECT_NE(r.exit_code, 0) << s;
    EXPECT_NE(r.err.find("out of memory: training's weights, gradients and AdamW state"),
              std::string::npos)
        << s << ": " << r.err;
    EXPECT_NE(r.err.find("on each of this node's 2 ranks"), std::string::npos)
        << s << ": " << r.err;
    EXPECT_FALSE(std::filesystem::exists(*dir_ + "/oom-" + s + "/checkpoints")) << s;
  }
}

TEST_F(DataParallelTest, GradientAccumulationAcrossRanksMatches) {
  // 2 ranks x batch 1 x grad_accum 2 takes the rows of one process's 2 x 2 in the same
  // micro-batches; sharded strategies reduce-scatter every micro-batch and accumulate shards.
  for (std::string s : {"no-shard", "grad-shard", "full-shard"}) {
    std::string name = "accum-" + s;
    RunResult r =
        run(name, 2, "--set train.batch_size=1 --set train.grad_accum=2 --set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    expect_same(name, reference(2));
    // Sharded gradients travel every micro-batch (and full-shard's blocks are gathered again).
    const std::vector<double> mib = losses(name, "comm_mib");
    ASSERT_FALSE(mib.empty()) << name;
    expect_planned_traffic(name, s, 2, 2, mib[0]);
  }
}

TEST_F(DataParallelTest, HybridAsTwoNodesOfTwoAndOffloadMatch) {
  const std::string& ref = reference(4);
  RunResult r = run("hybrid-4", 4,
                    "--set train.batch_size=2 --set dist.strategy=hybrid --set "
                    "dist.ranks_per_node=2");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("2 node(s) x 2"), std::string::npos) << r.out;
  expect_same("hybrid-4", ref);
  const std::vector<double> mib = losses("hybrid-4", "comm_mib");
  ASSERT_FALSE(mib.empty());
  expect_planned_traffic("hybrid-4", "hybrid", 4, 1, mib[0], /*shards=*/2);
  // Within a node the state is halved (full-shard over 2 ranks), replicated across nodes.
  RunResult one = run(
      "single-h", 1, "--set train.batch_size=2 --set train.grad_accum=4 --set dist.strategy=zero1");
  EXPECT_NEAR(memory(r.out).first / memory(one.out).first, 0.5, 0.005);

  RunResult o =
      run("offload-2", 2,
          "--set train.batch_size=2 --set dist.strategy=grad-shard --set dist.offload=true");
  ASSERT_EQ(o.exit_code, 0) << o.out << o.err;
  EXPECT_NE(o.out.find("dist.offload: AdamW master values and gradients in a host arena"),
            std::string::npos)
      << o.out;
  expect_same("offload-2", reference(2));
  // Offloaded full-shard resumes from its own checkpoint like any other.
  RunResult f =
      run("offload-full-2", 2,
          "--set train.batch_size=2 --set dist.strategy=full-shard --set dist.offload=true "
          "--set train.checkpoint_every=3");
  ASSERT_EQ(f.exit_code, 0) << f.out << f.err;
  expect_same("offload-full-2", reference(2));
}

TEST_F(DataParallelTest, FullShardAndHybridTrainInBf16LikeDdp) {
  // The bf16 copies of the matmul weights are made per gathered group (none of the whole
  // model): the same roundings of the same fp32 values as DDP's whole-model copies. Against DDP
  // with the same ranks, not one process: with bf16 weights a rounding-level difference in the
  // gradient sum (4 ranks vs 4 micro-batches) can flip a copy by a bf16 ulp, which DDP, zero1
  // and full-shard all show alike (~1e-4 relative in the parameters after 6 steps).
  // Both also sample at the end: full-shard gathers the model whole, with copies of its own.
  const std::string bf16 =
      "--set train.precision=bf16 --set train.batch_size=2 --set sample.prompt=The "
      "--set sample.max_tokens=8 ";
  auto sample = [](const std::string& out) { return out.substr(out.find("--- sample ---")); };
  // Also with bf16 master weights: bf16 shards gathered as bf16, the whole model gathered as bf16
  // for the sample.
  for (auto [n, masters] :
       {std::pair{2, false}, std::pair{4, false}, std::pair{2, true}, std::pair{4, true}}) {
    const std::string m = masters ? "--set train.master_weights=bf16 " : "";
    const std::string suffix = std::to_string(n) + (masters ? "-masters" : "");
    std::string ref = "bf16-ddp-" + suffix;
    RunResult d = run(ref, n, bf16 + m + "--set dist.strategy=no-shard");
    ASSERT_EQ(d.exit_code, 0) << d.out << d.err;
    std::string name = (n == 2 ? "bf16-full-shard-" : "bf16-hybrid-") + suffix;
    RunResult r = run(name, n,
                      bf16 + m +
                          (n == 2 ? "--set dist.strategy=full-shard"
                                  : "--set dist.strategy=hybrid --set dist.ranks_per_node=2"));
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    expect_same(name, ref);
    ASSERT_NE(d.out.find("--- sample ---"), std::string::npos) << d.out;
    ASSERT_NE(r.out.find("--- sample ---"), std::string::npos) << r.out;
    EXPECT_EQ(sample(r.out), sample(d.out)) << name;
  }
}

// bf16 master weights with the optimizer state sharded (zero1, grad-shard, full-shard, and each
// sharded one with the AdamW step offloaded to a host arena holding bf16 masters): each rank
// rounds its shard stochastically with the bits of the elements' flat indices, so the weights
// (all-gathered, or gathered block by block as bf16 under full-shard) are those DDP computes
// whole. Against DDP with the same ranks; a rounding-level difference in
// a gradient sum or the clipping norm can flip a rounding by one bf16 ulp (relative 2^-8), so
// single weights get one ulp and the whole vector 1e-3 relative.
TEST_F(DataParallelTest, Bf16MasterWeightsWithShardedOptimizerLikeDdp) {
  const std::string bf16 =
      "--set train.precision=bf16 --set train.master_weights=bf16 --set train.batch_size=2 ";
  RunResult d = run("bf16m-ddp", 2, bf16 + "--set dist.strategy=no-shard");
  ASSERT_EQ(d.exit_code, 0) << d.out << d.err;
  const double full_opt = memory(d.out).first;
  const double full_params = memory(d.out).second;
  for (std::string s :
       {"zero1", "grad-shard", "grad-shard+offload", "full-shard", "full-shard+offload"}) {
    const std::string name = "bf16m-" + s;
    const bool offload = s.ends_with("+offload");
    RunResult r = run(name, 2,
                      bf16 + "--set dist.strategy=" + s.substr(0, s.find('+')) +
                          (offload ? " --set dist.offload=true" : ""));
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NEAR(memory(r.out).first / full_opt, 0.5, 0.005) << name;
    // full-shard: each rank keeps half of the bf16 weights (and gathers blocks as bf16).
    if (s.starts_with("full-shard")) {
      EXPECT_NEAR(memory(r.out).second / full_params, 0.5, 0.005) << name;
    }
    // Offloaded: the host arena holds the shard's bf16 masters (2 bytes) and fp32 gradients.
    if (offload) {
      EXPECT_NE(r.out.find("dist.offload: AdamW master values and gradients in a host arena"),
                std::string::npos)
          << r.out;
    }
    const std::string ckpt = find_latest_checkpoint(*dir_ + "/" + name);
    // The weights are saved in bf16 (under full-shard each rank's shard file holds its slices).
    const std::string file = std::filesystem::exists(ckpt + "/model.safetensors")
                                 ? ckpt + "/model.safetensors"
                                 : ckpt + "/model-rank-00000-of-00002.safetensors";
    EXPECT_EQ(Safetensors::open(file).info("tok_emb.weight").dtype, "BF16") << name;
    std::vector<double> a = losses(name), b = losses("bf16m-ddp");
    ASSERT_EQ(a.size(), 6u);
    ASSERT_EQ(b.size(), 6u);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-3 * b[i]) << name << " " << i;
    std::vector<float> p = params(name), q = params("bf16m-ddp");
    ASSERT_EQ(p.size(), q.size());
    double dd = 0, qq = 0;
    int64_t differ = 0;
    for (size_t i = 0; i < p.size(); ++i) {
      const double diff = std::abs(static_cast<double>(p[i]) - q[i]);
      EXPECT_LE(diff, std::abs(q[i]) / 128 + 1e-30) << name << " weight " << i;
      differ += diff != 0;
      dd += diff * diff;
      qq += static_cast<double>(q[i]) * q[i];
    }
    EXPECT_LE(std::sqrt(dd / qq), 1e-3) << name;
    std::printf("%s vs bf16m-ddp: %lld of %zu weights differ\n", name.c_str(),
                static_cast<long long>(differ), p.size());
  }
  // full-shard's bf16 value shards in a checkpoint: resumed on the same 2 ranks the run continues
  // bit for bit; on 1 process (resharded, batch 4) within the tolerance above.
  RunResult f = run("bf16m-fs-ckpt", 2,
                    bf16 + "--set dist.strategy=full-shard --set train.checkpoint_every=3 " +
                        "--set train.keep_last=0");
  ASSERT_EQ(f.exit_code, 0) << f.out << f.err;
  const std::string ckpt = *dir_ + "/bf16m-fs-ckpt/checkpoints/step-00000003";
  const std::vector<double> whole = losses("bf16m-fs-ckpt");
  ASSERT_EQ(whole.size(), 6u);
  for (const auto& [name, ranks, extra] :
       {std::tuple{"bf16m-fs-resumed-2", 2, "--set dist.strategy=full-shard"},
        std::tuple{"bf16m-fs-resumed-1", 1, "--set train.batch_size=4"}}) {
    RunResult x = run(name, ranks, bf16 + extra + " --resume=" + ckpt);
    ASSERT_EQ(x.exit_code, 0) << name << "\n" << x.out << x.err;
    const std::vector<double> l = losses(name);
    ASSERT_EQ(l.size(), 3u) << name;
    for (size_t i = 0; i < 3; ++i) {
      if (ranks == 2)
        EXPECT_EQ(l[i], whole[3 + i]) << name << " step " << 4 + i;
      else
        EXPECT_NEAR(l[i], whole[3 + i], 1e-3 * whole[3 + i]) << name << " step " << 4 + i;
    }
  }
}

TEST_F(DataParallelTest, CheckpointOfFourRanksResumesOnTwoAndOne) {
  // 4 ranks x batch 2, full-shard, a checkpoint at step 3; then steps 4-6 on 2 ranks x batch 4
  // and on 1 process x batch 8: the same global batches, so the same losses.
  RunResult r = run("reshard-4", 4,
                    "--set train.batch_size=2 --set dist.strategy=full-shard --set "
                    "train.checkpoint_every=3 --set train.keep_last=0");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  std::string ckpt = *dir_ + "/reshard-4/checkpoints/step-00000003";
  ASSERT_TRUE(std::filesystem::exists(ckpt + "/model-rank-00003-of-00004.safetensors"));
  ASSERT_TRUE(std::filesystem::exists(ckpt + "/optimizer-rank-00000-of-00004.safetensors"));
  EXPECT_EQ(verify_checkpoint(ckpt), "");
  std::vector<double> full = losses("reshard-4");
  ASSERT_EQ(full.size(), 6u);
  struct Case {
    std::string name;
    int ranks;
    std::string extra;
  };
  // (and on 2 tensor-parallel groups of 2 x batch 4, full-shard across them: each rank reads its
  // share's pieces from the 4 ranks' slices)
  for (const Case& c : {Case{"reshard-2", 2, "--set train.batch_size=4 --set dist.strategy=zero1"},
                        Case{"reshard-1", 1, "--set train.batch_size=8"},
                        Case{"reshard-tp2", 4,
                             "--set train.batch_size=4 --set dist.tensor_parallel=2 --set "
                             "dist.strategy=full-shard"}}) {
    RunResult x = run(c.name, c.ranks, c.extra + " --resume=" + ckpt);
    ASSERT_EQ(x.exit_code, 0) << c.name << "\n" << x.out << x.err;
    std::vector<double> l = losses(c.name);
    ASSERT_EQ(l.size(), 3u) << c.name;
    for (size_t i = 0; i < 3; ++i)
      EXPECT_NEAR(l[i], full[3 + i], 1e-5 * full[3 + i]) << c.name << " step " << 4 + i;
  }
  // The sharded checkpoint consolidates into a single-file one holding the same values.
  RunResult c = testing::run_lmforge(
      "convert --from-checkpoint " + ckpt + " --out " + *dir_ + "/consolidated", *dir_);
  ASSERT_EQ(c.exit_code, 0) << c.err;
  std::string one = *dir_ + "/consolidated/checkpoints/step-00000003";
  EXPECT_TRUE(std::filesystem::exists(one + "/model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(one + "/optimizer.safetensors"));
  EXPECT_EQ(checkpoint_params(one), checkpoint_params(ckpt));
  // The single-process continuation wrote a single-file checkpoint; the sharded one exports.
  EXPECT_TRUE(
      std::filesystem::exists(*dir_ + "/reshard-1/checkpoints/step-00000006/model.safetensors"));
  RunResult e =
      testing::run_lmforge("export --checkpoint " + ckpt + " --to-hf " + *dir_ + "/hf", *dir_);
  EXPECT_EQ(e.exit_code, 0) << e.err;
}

TEST_F(DataParallelTest, ADeadOrHungRankStopsTheJobNamingIt) {
  RunResult k = run("kill", 2, "--set train.batch_size=2 --set train.inject_fault=kill@3");
  EXPECT_NE(k.exit_code, 0);
  EXPECT_NE((k.out + k.err).find("rank 1"), std::string::npos) << k.out << k.err;

  testing::expect_hung_rank_named(run("hang", 2, testing::kHangAtStep3));
}

}  // namespace
}  // namespace lmforge
