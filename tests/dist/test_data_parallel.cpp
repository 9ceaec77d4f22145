// Data parallelism over MPI ranks (lmforge launch --nproc N, oversubscribing the 2 cores with one
// thread per rank): every strategy against one process that sees the same global batch (batch B
// with grad_accum N, the rows rank r would take as micro-batch r). The reduction orders differ
// (MPI's sum over ranks vs accumulation over micro-batches), so losses must agree to 1e-6
// relative (gradient norms 1e-5) and final parameters to 1e-5 in relative L2 norm and 1e-3 for
// any one (AdamW can turn a rounding-level difference of a tiny gradient into a sizeable step); the
// tests also report when they are bit-identical. Then: sharded memory is 1/N, a checkpoint saved by
// 4 ranks resumes on 2 and 1, hybrid as 2 nodes x 2, and a rank that dies or hangs stops the job
// naming it. Tensor parallelism (dist.tensor_parallel) is compared the same way: a group of ranks
// sharing each block against one process with the group's batch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>

#include "dist/tiny_run.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/dist/tensor_parallel.h"
#include "lmforge/io/safetensors.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/plan/planner.h"
#include "lmforge/train/checkpoint.h"
#include "lmforge/train/trainer.h"
#include "testing/metrics.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using testing::RunResult;

const char* const kTrain = testing::kTinyTrain;

class DataParallelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    setenv("OMP_NUM_THREADS", "1", 1);  // ranks oversubscribe the cores: one thread each
    dir_ = new std::string(testing::temp_dir("dp"));
  }
  static void TearDownTestSuite() { delete dir_; }

  // Trains in run directory `name` with n ranks (n = 1: a plain process); extra --set args
  // after `train` (the tiny run's command).
  static RunResult run(const std::string& name, int n, const std::string& extra,
                       const std::string& train = kTrain) {
    std::string args = train + "--set run.dir=" + *dir_ + "/" + name + " " + extra;
    if (n > 1) args = "launch --nproc " + std::to_string(n) + " -- " + args;
    return testing::run_lmforge(args, *dir_);
  }
  // One process with the same global batch as n ranks of batch 2: batch 2 x grad_accum n.
  static const std::string& reference(int n) {
    static std::map<int, std::string> made;
    if (!made.count(n)) {
      std::string name = "ref" + std::to_string(n);
      RunResult r =
          run(name, 1, "--set train.batch_size=2 --set train.grad_accum=" + std::to_string(n));
      EXPECT_EQ(r.exit_code, 0) << r.err;
      made[n] = name;
    }
    return made[n];
  }
  static std::vector<double> losses(const std::string& name, const char* key = "loss") {
    std::vector<double> out;
    for (auto& j : testing::records_of(*dir_ + "/" + name + "/metrics.jsonl", key))
      out.push_back(j[key].get<double>());
    return out;
  }
  // The final parameters of a run (its last checkpoint, sharded or not), flat.
  static std::vector<float> params(const std::string& name) {
    std::string ckpt = find_latest_checkpoint(*dir_ + "/" + name);
    EXPECT_FALSE(ckpt.empty()) << name;
    return checkpoint_params(ckpt);
  }
  static std::vector<float> checkpoint_params(const std::string& ckpt) {
    Transformer m(checkpoint_model_config(ckpt));
    load_checkpoint(ckpt, m, nullptr, nullptr);
    Tensor v = m.params().flat_values();
    return std::vector<float>(v.data<float>(), v.data<float>() + v.numel());
  }
  // Compares a run with the reference of the same global batch; returns whether bit-identical.
  // loss_rel, norm_rel: the losses' and gradient norms' relative tolerances.
  static bool expect_same(const std::string& name, const std::string& ref, double loss_rel = 1e-6,
                          double norm_rel = 1e-5) {
    std::vector<double> a = losses(name), b = losses(ref);
    EXPECT_EQ(a.size(), 6u) << name;
    EXPECT_EQ(a.size(), b.size());
    bool exact = a == b;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
      EXPECT_NEAR(a[i], b[i], loss_rel * std::abs(b[i])) << name << " step " << i + 1;
    // AdamW hides a uniformly scaled gradient; the norm does not.
    std::vector<double> na = losses(name, "grad_norm"), nb = losses(ref, "grad_norm");
    EXPECT_EQ(na.size(), nb.size());
    for (size_t i = 0; i < std::min(na.size(), nb.size()); ++i)
      EXPECT_NEAR(na[i], nb[i], norm_rel * nb[i]) << name << " grad norm, step " << i + 1;
    std::vector<float> p = params(name), q = params(ref);
    EXPECT_EQ(p.size(), q.size());
    // AdamW's step is lr * m / sqrt(v): for a near-zero gradient a rounding-level difference
    // can move one parameter by up to lr, so single parameters get a third of one step (1e-3)
    // and the whole vector 1e-5 relative (a wrong shard or update shows as ~1e-1).
    double worst = 0, dd = 0, qq = 0;
    for (size_t i = 0; i < std::min(p.size(), q.size()); ++i) {
      double d = std::abs(static_cast<double>(p[i]) - q[i]);
      worst = std::max(worst, d);
      dd += d * d;
      qq += static_cast<double>(q[i]) * q[i];
    }
    const double rel = std::sqrt(dd / qq);
    EXPECT_LE(worst, 1e-3) << name;
    EXPECT_LE(rel, 1e-5) << name;
    exact = exact && worst == 0;
    std::printf("%s vs %s: %s (max |dparam| %.3g, |dparam| / |param| %.3g)\n", name.c_str(),
                ref.c_str(), exact ? "bit-identical" : "within tolerance", worst, rel);
    return exact;
  }
  // training_footprint() against what rank 0 reported holding ("dist: ... optimizer state N
  // bytes, parameters N bytes (+ G bytes of gather buffers), gradients N bytes"): each part
  // within 1% (the prediction leaves out the 64-byte alignment of each parameter and shard).
  // tp: a share of tensor parallelism's groups of tp ranks (n: the groups), with 1/tp of the
  // vocabulary (vocab: as train/trainer.h's vocab_parallel decides on the CPU).
  static void expect_footprint(const std::string& out, const std::string& strategy, int n,
                               const std::string& run_name, bool muon = false, int tp = 1,
                               bool vocab = true) {
    std::smatch m;
    std::regex re(
        "optimizer state (\\d+) bytes, parameters (\\d+) bytes \\(\\+ (\\d+) bytes of gather "
        "buffers\\), gradients (\\d+) bytes");
    ASSERT_TRUE(std::regex_search(out, m, re)) << out;
    FootprintOptions o;
    o.strategy = static_cast<int>(dist::parse_strategy(strategy));
    o.shards = n;
    o.muon = muon;
    o.tensor_parallel = tp;
    const TrainingFootprint f = training_footprint(
        dist::tensor_parallel_config(
            checkpoint_model_config(find_latest_checkpoint(*dir_ + "/" + run_name)), tp,
            tp > 1 && vocab),
        o);
    const double held[] = {std::stod(m[1]), std::stod(m[2]), std::stod(m[3]), std::stod(m[4])};
    const double predicted[] = {f.optimizer, f.values, f.gather, f.gradients};
    const char* part[] = {"optimizer", "values", "gather", "gradients"};
    for (int i = 0; i < 4; ++i)
      EXPECT_NEAR(predicted[i], held[i], 0.01 * held[i] + 1024) << run_name << " " << part[i];
    std::printf("%s: footprint %.0f bytes predicted, %.0f held\n", run_name.c_str(), f.total(),
                held[0] + held[1] + held[2] + held[3]);
  }
  // lmforge plan's bytes per step and rank (step_traffic_bytes) against the counted ones, within
  // 0.5% (it leaves out the 64-byte alignment gaps between parameters).
  // reference_forwards: DPO's or KTO's reference held, with so many forwards per micro-batch;
  // policy_forwards: the policy's forwards without a backward.
  static void expect_planned_traffic(const std::string& run_name, const std::string& strategy,
                                     int n, int64_t grad_accum, double measured_mib, int shards = 0,
                                     bool muon = false, int reference_forwards = 0,
                                     int policy_forwards = 0) {
    FootprintOptions o;
    o.strategy = static_cast<int>(dist::parse_strategy(strategy));
    o.shards = shards ? shards : n;
    o.muon = muon;
    o.reference = reference_forwards > 0;
    o.reference_forwards = reference_forwards;
    o.policy_forwards = policy_forwards;
    const double planned = step_traffic_bytes(
        checkpoint_model_config(find_latest_checkpoint(*dir_ + "/" + run_name)), o, n, grad_accum);
    EXPECT_NEAR(planned, measured_mib * 1048576.0, 0.005 * planned) << run_name << " (planned)";
  }
  // "dist: ... optimizer state N bytes, parameters N bytes ..." of rank 0.
  static std::pair<double, double> memory(const std::string& out) {
    std::smatch m;
    std::regex re("optimizer state (\\d+) bytes, parameters (\\d+) bytes");
    EXPECT_TRUE(std::regex_search(out, m, re)) << out;
    return {std::stod(m[1]), std::stod(m[2])};
  }
  // The bytes per step and rank that a strategy's collectives send with n ranks (without
  // gradient accumulation), from the model's group sizes: a ring all-reduce of B bytes sends
  // 2(n-1)/n B from each rank, a reduce-scatter or all-gather of B bytes (n-1)/n B.
  //   no-shard    all-reduce of the gradients
  //   zero1       the same, then an all-gather of the updated parameters
  //   grad-shard  reduce-scatter of the gradients, all-gather of the parameters
  //   full-shard  reduce-scatter of the gradients; all-gathers of the embeddings and head (once
  //               a step), of every block before its forward, and before its backward of every
  //               block but the last two (still in the two gather buffers after the forward)
  static double traffic_in_theory(const std::string& s, int n, const std::string& run_name) {
    Transformer m(checkpoint_model_config(find_latest_checkpoint(*dir_ + "/" + run_name)));
    const ParamSet& ps = m.params();
    auto lo = [&](int64_t g) {
      return g < m.num_groups() ? ps.offset(ps.params()[m.group_begin(g)]) : ps.flat_size();
    };
    // P: every value, T: the trained ones (their gradients and updates travel; all but under
    // LoRA).
    const double P = 4.0 * static_cast<double>(ps.flat_size()), k = (n - 1.0) / n;
    double T = 0;
    for (const auto& [a, b] : ps.trainable_ranges()) T += 4.0 * static_cast<double>(b - a);
    const int64_t L = m.config().n_layer;
    double blocks = 0, regathered = 0;
    for (int64_t g = 1; g <= L; ++g) {
      const double b = 4.0 * static_cast<double>(lo(g + 1) - lo(g));
      blocks += b;
      if (g <= L - 2) regathered += b;
    }
    if (s == "no-shard") return 2 * k * T;
    if (s == "zero1") return 3 * k * T;
    if (s == "grad-shard") return 2 * k * T;
    return k * T + k * ((P - blocks) + blocks + regathered);  // full-shard
  }
  static std::string* dir_;
};
std::string* DataParallelTest::dir_ = nullptr;

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
  for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
    RunResult r = run("lora-" + s, 2, lora + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << s << "\n" << r.out << r.err;
    expect_same("lora-" + s, "lora-ref");
    EXPECT_LE(memory(r.out).first, ref_opt) << s;
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
    const double adapters = 4.0 * 4 * 4 * (128 + 384 + 128 + 128 + 128 + 512 + 512 + 128);
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
  const std::vector<double> whole = losses("muon-ckpt"), rest = losses("muon-resume");
  ASSERT_EQ(whole.size(), 6u);
  ASSERT_EQ(rest.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(rest[i], whole[3 + i]) << "step " << 4 + i;
  EXPECT_EQ(params("muon-resume"), params("muon-ckpt"));
  RunResult one = run("muon-resume-1", 1, muon + "--set train.grad_accum=2 --resume=" + ckpt);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const std::vector<double> l = losses("muon-resume-1");
  ASSERT_EQ(l.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(l[i], whole[3 + i], 1e-5 * whole[3 + i]) << "1 process, step " << 4 + i;

  // Tensor parallelism: each matrix's update direction assembled whole over the group (Muon
  // orthogonalizes the whole model's matrices), each rank applying its share of the result; the
  // gathers counted in tp_comm_mib as lmforge plan counts them.
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
  const std::vector<double> all = losses("muon-tp2-fsdp"), tail = losses("muon-tp2-fsdp-resume");
  ASSERT_EQ(tail.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(tail[i], all[3 + i]) << "step " << 4 + i;
  EXPECT_EQ(params("muon-tp2-fsdp-resume"), params("muon-tp2-fsdp"));
}

// DPO (train/objective.h) under every strategy (and KTO under tensor parallelism): its reference
// model's forward, the per-pair normalization over ranks and micro-batches and the per-row gradient
// weights give one process's step with the same global batch; so do precomputed reference
// log-likelihoods.
TEST_F(DataParallelTest, DpoOnEveryStrategyMatchesOneProcess) {
  {
    std::ofstream f(*dir_ + "/pairs.jsonl");
    for (int i = 0; i < 40; ++i)
      f << nlohmann::json({{"prompt", "Verse " + std::to_string(i) + ": "},
                           {"chosen", i % 3 ? "In the beginning." : "And God said, Let there be."},
                           {"rejected", i % 2 ? "Selah." : "And it was so, and it was good."}})
               .dump()
        << "\n";
  }
  RunResult p = testing::run_lmforge(
      "prepare --input pairs.jsonl --output prefs --format preference --val-fraction 0", *dir_);
  ASSERT_EQ(p.exit_code, 0) << p.err;
  const std::string dpo =
      "--set train.objective=dpo --set train.dpo_beta=0.5 --set data.text= --set "
      "data.tokenizer=byte "
      "--set model.vocab_size=0 --set data.train=prefs/data --set train.batch_size=2 ";
  RunResult ref = run("dpo-ref", 1, dpo + "--set train.grad_accum=2");
  ASSERT_EQ(ref.exit_code, 0) << ref.out << ref.err;
  for (std::string s : {"no-shard", "zero1", "grad-shard", "full-shard"}) {
    RunResult r = run("dpo-" + s, 2, dpo + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << s << "\n" << r.out << r.err;
    expect_same("dpo-" + s, "dpo-ref");
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
  expect_same("dpo-pre", "dpo-ref");
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
  {
    std::ofstream f(*dir_ + "/labelled.jsonl");
    for (int i = 0; i < 40; ++i)
      f << nlohmann::json({{"prompt", "Verse " + std::to_string(i) + ": "},
                           {"completion", i % 3 ? "In the beginning." : "Selah."},
                           {"label", i % 3 != 0}})
               .dump()
        << "\n";
  }
  p = testing::run_lmforge(
      "prepare --input labelled.jsonl --output labelled --format unpaired --val-fraction 0", *dir_);
  ASSERT_EQ(p.exit_code, 0) << p.err;
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

TEST_F(DataParallelTest, TensorParallelMatchesOneProcess) {
  // One process ("ref-NAME") and a group of 2 ("tp2-NAME") with the same options: the same
  // training.
  auto like_one_process = [&](const std::string& name, const std::string& extra) {
    RunResult one = run("ref-" + name, 1, extra);
    ASSERT_EQ(one.exit_code, 0) << one.err;
    RunResult two = run("tp2-" + name, 2, extra + " --set dist.tensor_parallel=2");
    ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
    expect_same("tp2-" + name, "ref-" + name);
  };
  // A group of 2 ranks splitting every block (GPT-2: biases, learned positions; Llama: GQA, RoPE,
  // SwiGLU), and 2 groups of 2 with data parallelism across them.
  RunResult r = run("tp2", 2, "--set train.batch_size=2 --set dist.tensor_parallel=2");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("over 1 groups of 2 tensor-parallel ranks; global batch 2"),
            std::string::npos)
      << r.out;
  expect_same("tp2", reference(1));
  // Per step 4 all-reduces of the (B, T, C) fp32 partial sums per block (2 in forward, 2 in
  // backward), and with the vocabulary split 2 more (the embeddings, the LM head's input
  // gradient), each sending 2 (n - 1) / n of its bytes from a rank in a ring; and the gather of
  // the loss's statistics (3 doubles a row from each rank).
  // (lmforge plan's figure, and the memory it predicts for a share.)
  const ModelConfig c = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/tp2"));
  const double expected =
      (4.0 * c.n_layer + 2) * 2 * 32 * c.n_embd * 4 * (2.0 * (2 - 1) / 2) + 2 * 32 * 24.0;
  EXPECT_DOUBLE_EQ(tensor_parallel_traffic_bytes(c, 2, 32, 2, 1, {.vocab_parallel = true}),
                   expected);
  const std::vector<double> tp_mib = losses("tp2", "tp_comm_mib");
  EXPECT_EQ(tp_mib.size(), 6u);
  for (double mib : tp_mib) EXPECT_DOUBLE_EQ(mib * 1048576.0, expected);
  expect_footprint(r.out, "no-shard", 1, "tp2", false, 2);

  RunResult d = run("tp2-dp2", 4, "--set train.batch_size=2 --set dist.tensor_parallel=2");
  ASSERT_EQ(d.exit_code, 0) << d.out << d.err;
  EXPECT_NE(d.out.find("over 2 groups of 2 tensor-parallel ranks; global batch 4"),
            std::string::npos)
      << d.out;
  expect_same("tp2-dp2", reference(2));

  // (At lr 1e-3: at 3e-3 this Llama's loss bounces and rounding-level differences grow to 4e-5
  // in the step-6 gradient norm; at 1e-3 they stay below 2e-6.)
  const std::string llama =
      "--set model.preset=llama3-tiny --set train.batch_size=2 --set train.lr=1e-3";
  like_one_process("llama", llama);

  // Qwen3's q/k norms: each rank's heads give part of their gradients, summed over the group
  // (also under sequence parallelism, whose gathered rows then reach them).
  const std::string qk = llama + " --set model.qk_norm=true";
  RunResult qo = run("ref-qk", 1, qk);
  ASSERT_EQ(qo.exit_code, 0) << qo.err;
  for (const char* extra : {"", " --set dist.sequence_parallel=true"}) {
    const std::string name = std::string("tp2-qk") + (*extra ? "-sp" : "");
    RunResult q = run(name, 2, qk + " --set dist.tensor_parallel=2" + extra);
    ASSERT_EQ(q.exit_code, 0) << q.out << q.err;
    expect_same(name, "ref-qk");
  }

  // LoRA on every layer: a column-parallel layer's B split with it, a row-parallel layer's A; the
  // replicated factors' gradients summed over the group.
  like_one_process("lora", "--set train.batch_size=2 --set model.lora_rank=4");

  // Distillation: the teacher (tp2's model) runs whole on every rank of the group.
  like_one_process("distill",
                   "--set train.batch_size=2 --set model.n_layer=2 --set "
                   "train.objective=distill --set train.teacher=" +
                       *dir_ + "/tp2");

  // NEFTune: the ranks of a group add the same noise to their shared rows (one process's).
  like_one_process("neftune", "--set train.batch_size=2 --set train.neftune_alpha=5");

  // The LM head in chunks of 11 rows and a shorter last one (of 64 rows, or a rank's 32 under
  // sequence parallelism), each chunk's loss statistics gathered over the group.
  setenv("LMFORGE_LOGITS_CHUNK_ROWS", "12", 1);
  like_one_process("chunks", "--set train.batch_size=2");
  RunResult cs = run("sp2-chunks", 2,
                     "--set train.batch_size=2 --set dist.tensor_parallel=2 --set "
                     "dist.sequence_parallel=true");
  unsetenv("LMFORGE_LOGITS_CHUNK_ROWS");
  ASSERT_EQ(cs.exit_code, 0) << cs.out << cs.err;
  expect_same("sp2-chunks", "ref-chunks");

  // bf16: the partial sums stay fp32 where one process rounds the branches to bf16 (a few 1e-4
  // apart; a share summed wrongly moves the loss by far more).
  const std::string bf16 = "--set train.batch_size=2 --set train.precision=bf16";
  RunResult bo = run("ref-bf16", 1, bf16);
  ASSERT_EQ(bo.exit_code, 0) << bo.err;
  RunResult b = run("tp2-bf16", 2, bf16 + " --set dist.tensor_parallel=2");
  ASSERT_EQ(b.exit_code, 0) << b.out << b.err;
  std::vector<double> lb = losses("tp2-bf16"), lo = losses("ref-bf16");
  ASSERT_EQ(lb.size(), lo.size());
  for (size_t i = 0; i < lb.size(); ++i)
    EXPECT_NEAR(lb[i], lo[i], 1e-3 * lo[i]) << "step " << i + 1;
}

TEST_F(DataParallelTest, TensorParallelCheckpointsResumeBitExactAndAnywhere) {
  // The checkpoint holds the whole model (as one process writes it): a resume with the same
  // group is bit-exact, and one process continues it like the group.
  RunResult r = run("tp-ckpt", 2,
                    "--set train.batch_size=2 --set dist.tensor_parallel=2 --set "
                    "train.checkpoint_every=3 --set train.keep_last=0");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const std::string ckpt = *dir_ + "/tp-ckpt/checkpoints/step-00000003";
  EXPECT_EQ(verify_checkpoint(ckpt), "");
  EXPECT_TRUE(std::filesystem::exists(ckpt + "/model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(ckpt + "/optimizer.safetensors"));
  const std::vector<double> full = losses("tp-ckpt");
  ASSERT_EQ(full.size(), 6u);
  RunResult again =
      run("tp-resume", 2, "--set train.batch_size=2 --set dist.tensor_parallel=2 --resume=" + ckpt);
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  std::vector<double> l = losses("tp-resume");
  ASSERT_EQ(l.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(l[i], full[3 + i]) << "step " << 4 + i;
  EXPECT_EQ(params("tp-resume"), params("tp-ckpt"));
  RunResult one = run("tp-resume-1", 1, "--set train.batch_size=2 --resume=" + ckpt);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  l = losses("tp-resume-1");
  ASSERT_EQ(l.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(l[i], full[3 + i], 1e-5 * full[3 + i]) << "1 process, step " << 4 + i;
  // zero1 across 2 groups of 2 (each share's AdamW state halved over its 2 data-parallel ranks):
  // like one process, the state gathered whole into the checkpoint, a bit-exact resume.
  const std::string z1 =
      "--set train.batch_size=2 --set dist.tensor_parallel=2 --set "
      "dist.strategy=zero1 ";
  RunResult z = run("tp-z1", 4, z1 + "--set train.checkpoint_every=3 --set train.keep_last=0");
  ASSERT_EQ(z.exit_code, 0) << z.out << z.err;
  expect_same("tp-z1", reference(2));
  expect_footprint(z.out, "zero1", 2, "tp-z1", false, 2);
  const std::string zckpt = *dir_ + "/tp-z1/checkpoints/step-00000003";
  EXPECT_TRUE(std::filesystem::exists(zckpt + "/optimizer.safetensors"));
  RunResult zr = run("tp-z1-resume", 4, z1 + "--resume=" + zckpt);
  ASSERT_EQ(zr.exit_code, 0) << zr.out << zr.err;
  const std::vector<double> zl = losses("tp-z1"), zrl = losses("tp-z1-resume");
  ASSERT_EQ(zrl.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(zrl[i], zl[3 + i]) << "zero1, step " << 4 + i;
  EXPECT_EQ(params("tp-z1-resume"), params("tp-z1"));

  // init_from a checkpoint: each rank takes its share of the loaded model, as one process trains
  // from it.
  const std::string from = "--set train.batch_size=2 --set train.steps=3 --set init_from=" + ckpt;
  RunResult fo = run("ref-init", 1, from);
  ASSERT_EQ(fo.exit_code, 0) << fo.err;
  RunResult ft = run("tp-init", 2, from + " --set dist.tensor_parallel=2");
  ASSERT_EQ(ft.exit_code, 0) << ft.out << ft.err;
  l = losses("tp-init");
  const std::vector<double> lo = losses("ref-init");
  ASSERT_EQ(l.size(), 3u);
  ASSERT_EQ(lo.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(l[i], lo[i], 1e-6 * lo[i]) << "init_from, step " << i + 1;

  // The end's sample comes from the whole model, gathered.
  RunResult s = run("tp-sample", 2,
                    "--set train.batch_size=2 --set dist.tensor_parallel=2 --set train.steps=1 "
                    "--set sample.prompt=The --set sample.max_tokens=8");
  ASSERT_EQ(s.exit_code, 0) << s.out << s.err;
  EXPECT_NE(s.out.find("--- sample ---"), std::string::npos) << s.out;
}

TEST_F(DataParallelTest, InitFromGivesEachRankItsPartAsOneProcessLoadsIt) {
  // init_from under tensor parallelism (each rank's share) and full-shard (each rank's shard) is
  // read one parameter at a time, never the whole model: the same training as one process that
  // loads it whole, from an lmforge checkpoint and from a Hugging Face directory, LoRA adapters
  // the source lacks starting from the seed's values as in one process.
  RunResult src = run(
      "init-src", 1, "--set train.batch_size=2 --set train.steps=3 --set train.checkpoint_every=3");
  ASSERT_EQ(src.exit_code, 0) << src.err;
  const std::string ckpt = *dir_ + "/init-src/checkpoints/step-00000003";
  RunResult ex = testing::run_lmforge(
      "export --checkpoint " + ckpt + " --to-hf " + *dir_ + "/init-src-hf", *dir_);
  ASSERT_EQ(ex.exit_code, 0) << ex.err;
  struct Source {
    std::string tag, spec;
  };
  for (const Source& from : {Source{"ckpt", ckpt}, Source{"hf", "hf:" + *dir_ + "/init-src-hf"}}) {
    // (a Hugging Face source fixes the architecture: the tiny run without its preset)
    std::string train = kTrain;
    const std::string preset = "--set model.preset=gpt2-tiny ";
    if (from.tag == "hf") train.erase(train.find(preset), preset.size());
    const std::string base =
        "--set train.steps=3 --set init_from=" + from.spec +
        (from.tag == "hf" ? " --set model.lora_rank=4 --set train.lr=1e-3 " : " ");
    struct Case {
      std::string name, args, one_args, says;
    };
    for (const Case& c :
         {Case{"tp2", "--set train.batch_size=2 --set dist.tensor_parallel=2",
               "--set train.batch_size=2", "each rank's share of its"},
          Case{"fs2", "--set train.batch_size=2 --set dist.strategy=full-shard",
               "--set train.batch_size=2 --set train.grad_accum=2", "each rank's shard of its"}}) {
      const std::string name = "init-" + from.tag + "-" + c.name, one = name + "-one";
      RunResult o = run(one, 1, base + c.one_args, train);
      ASSERT_EQ(o.exit_code, 0) << one << "\n" << o.err;
      RunResult x = run(name, 2, base + c.args, train);
      ASSERT_EQ(x.exit_code, 0) << name << "\n" << x.out << x.err;
      EXPECT_NE(x.out.find(c.says), std::string::npos) << name << "\n" << x.out;
      const std::vector<double> a = losses(name), b = losses(one);
      ASSERT_EQ(a.size(), 3u) << name;
      ASSERT_EQ(b.size(), 3u) << one;
      for (size_t i = 0; i < 3; ++i)
        EXPECT_NEAR(a[i], b[i], 1e-6 * b[i]) << name << " step " << i + 1;
    }
  }
}

TEST_F(DataParallelTest, TensorParallelWithShardedDataParallelMatchesOneProcess) {
  // 2-D parallelism: 2 groups of 2, each share's gradients (grad-shard) and values (full-shard)
  // split over the 2 ranks holding it; hybrid as 2 nodes, one group each (the shards within a
  // node, all-reduced across). The same training as one process with the global batch.
  const std::string tp2 = "--set train.batch_size=2 --set dist.tensor_parallel=2 ";
  for (std::string s : {"grad-shard", "full-shard"}) {
    const std::string name = "tp2-" + s;
    RunResult r = run(name, 4, tp2 + "--set dist.strategy=" + s);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.out.find(s + " over 2 groups of 2 tensor-parallel ranks"), std::string::npos)
        << r.out;
    expect_same(name, reference(2));
    expect_footprint(r.out, s, 2, name, false, 2);
  }
  // (8 ranks as 2 nodes of 4: each share sharded over its 2 ranks on a node)
  RunResult h =
      run("tp2-hybrid", 8, tp2 + "--set dist.strategy=hybrid --set dist.ranks_per_node=4");
  ASSERT_EQ(h.exit_code, 0) << h.out << h.err;
  EXPECT_NE(h.out.find("2 node(s) x 4"), std::string::npos) << h.out;
  expect_same("tp2-hybrid", reference(4));
  // Gradient accumulation (each micro-batch reduce-scattered, the shards summed), and sequence
  // parallelism (the embeddings' and norms' gradients summed over the group on the shards).
  RunResult a = run("tp2-grad-shard-accum", 4,
                    "--set train.batch_size=1 --set train.grad_accum=2 --set "
                    "dist.tensor_parallel=2 --set dist.strategy=grad-shard");
  ASSERT_EQ(a.exit_code, 0) << a.out << a.err;
  expect_same("tp2-grad-shard-accum", reference(2));
  RunResult q = run("sp2-full-shard", 4,
                    tp2 + "--set dist.strategy=full-shard --set dist.sequence_parallel=true");
  ASSERT_EQ(q.exit_code, 0) << q.out << q.err;
  expect_same("sp2-full-shard", reference(2));
  // LoRA (the frozen base never reduced; the replicated factors' partial gradients summed on the
  // shards) with Llama's q/k norms (likewise).
  const std::string lora =
      "--set model.preset=llama3-tiny --set model.qk_norm=true --set train.lr=1e-3 --set "
      "train.batch_size=2 --set model.lora_rank=4 ";
  RunResult lo = run("ref-lora-qk", 1, lora + "--set train.grad_accum=2");
  ASSERT_EQ(lo.exit_code, 0) << lo.err;
  RunResult lt = run("tp2-lora-qk-grad-shard", 4,
                     lora + "--set dist.tensor_parallel=2 --set dist.strategy=grad-shard");
  ASSERT_EQ(lt.exit_code, 0) << lt.out << lt.err;
  expect_same("tp2-lora-qk-grad-shard", "ref-lora-qk");

  // Checkpoints hold the whole model (each share's values and state gathered over its shards
  // first): a resume is bit-exact, one process continues it, and the end's sample is the whole
  // model's.
  const std::string full = tp2 + "--set dist.strategy=full-shard ";
  RunResult c = run("tp2-full-ckpt", 4,
                    full +
                        "--set train.checkpoint_every=3 --set train.keep_last=0 --set "
                        "sample.prompt=The --set sample.max_tokens=8");
  ASSERT_EQ(c.exit_code, 0) << c.out << c.err;
  EXPECT_NE(c.out.find("--- sample ---"), std::string::npos) << c.out;
  const std::string ckpt = *dir_ + "/tp2-full-ckpt/checkpoints/step-00000003";
  EXPECT_TRUE(std::filesystem::exists(ckpt + "/model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(ckpt + "/optimizer.safetensors"));
  RunResult again = run("tp2-full-resume", 4, full + "--resume=" + ckpt);
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  const std::vector<double> whole = losses("tp2-full-ckpt"), rest = losses("tp2-full-resume");
  ASSERT_EQ(whole.size(), 6u);
  ASSERT_EQ(rest.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(rest[i], whole[3 + i]) << "step " << 4 + i;
  EXPECT_EQ(params("tp2-full-resume"), params("tp2-full-ckpt"));
  RunResult one = run("tp2-full-resume-1", 1,
                      "--set train.batch_size=2 --set train.grad_accum=2 --resume=" + ckpt);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const std::vector<double> l = losses("tp2-full-resume-1");
  ASSERT_EQ(l.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(l[i], whole[3 + i], 1e-5 * whole[3 + i]) << "1 process, step " << 4 + i;
}

// bf16 master weights under tensor parallelism: each rank keeps its share's weights in bf16 and
// rounds its updates stochastically by its share's element indices (one process by the whole's),
// so the weights follow one process's to within the roundings' noise; full-shard across the groups
// gathers the bf16 shards; checkpoints hold bf16 values and resume bit-exactly. The noise, measured
// after these 6 steps as |dparam| / |param|: 0.99% against one process with bf16 masters, where
// tensor parallelism with fp32 masters is 0.65% from one process and one process's bf16 masters
// 0.93% from its fp32 ones (AdamW's early steps magnify every rounding); the losses agree to
// 1.5e-4. A wrong share or rounding moves the loss from step 2 on.
TEST_F(DataParallelTest, TensorParallelWithBf16MasterWeights) {
  const std::string bf16 =
      "--set train.precision=bf16 --set train.master_weights=bf16 --set train.batch_size=2 ";
  RunResult one = run("bf16m-one", 1, bf16 + "--set train.grad_accum=2");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const std::string tpfs = bf16 +
                           "--set dist.tensor_parallel=2 --set dist.strategy=full-shard --set "
                           "train.checkpoint_every=3 --set train.keep_last=0 ";
  RunResult r = run("bf16m-tp2-fs", 4, tpfs);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const std::vector<double> a = losses("bf16m-tp2-fs"), b = losses("bf16m-one");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-3 * b[i]) << "step " << i + 1;
  const std::vector<float> p = params("bf16m-tp2-fs"), q = params("bf16m-one");
  ASSERT_EQ(p.size(), q.size());
  double dd = 0, qq = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    dd += (static_cast<double>(p[i]) - q[i]) * (static_cast<double>(p[i]) - q[i]);
    qq += static_cast<double>(q[i]) * q[i];
  }
  std::printf("bf16m-tp2-fs vs bf16m-one: |dparam| / |param| %.3g\n", std::sqrt(dd / qq));
  EXPECT_LE(std::sqrt(dd / qq), 3e-2);
  // (one group of 2 accumulating the same batch: each rank's bf16 share widened for the save)
  RunResult g = run("bf16m-tp2", 2, bf16 + "--set dist.tensor_parallel=2 --set train.grad_accum=2");
  ASSERT_EQ(g.exit_code, 0) << g.out << g.err;
  const std::vector<double> ga = losses("bf16m-tp2");
  ASSERT_EQ(ga.size(), b.size());
  for (size_t i = 0; i < ga.size(); ++i)
    EXPECT_NEAR(ga[i], b[i], 1e-3 * b[i]) << "no-shard, step " << i + 1;
  EXPECT_EQ(checkpoint_dtypes(find_latest_checkpoint(*dir_ + "/bf16m-tp2")),
            std::set<std::string>{"BF16"});
  const std::string ckpt = *dir_ + "/bf16m-tp2-fs/checkpoints/step-00000003";
  EXPECT_EQ(checkpoint_dtypes(ckpt), std::set<std::string>{"BF16"});
  RunResult again = run("bf16m-tp2-fs-resume", 4, tpfs + "--resume=" + ckpt);
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  const std::vector<double> c = losses("bf16m-tp2-fs-resume");
  ASSERT_EQ(c.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(c[i], a[3 + i]) << "resumed, step " << 4 + i;
  EXPECT_EQ(params("bf16m-tp2-fs-resume"), params("bf16m-tp2-fs"));
}

TEST_F(DataParallelTest, SequenceParallelMatchesOneProcess) {
  // A group of 2 shares a batch of 2 rows as under tensor parallelism alone, each rank holding 1
  // outside attention and the MLP (which run on the group's rows, gathered): the same training as
  // one process with the group's batch.
  const std::string sp = "--set dist.tensor_parallel=2 --set dist.sequence_parallel=true ";
  // One process ("ref-sp-NAME", unless `against` names a run already made) and a group of 2
  // ("sp2-NAME") with the same options: the same training.
  auto sp_like_one_process = [&](const std::string& name, const std::string& args,
                                 std::string against = "") {
    if (against.empty()) {
      against = "ref-sp-" + name;
      RunResult one = run(against, 1, args);
      ASSERT_EQ(one.exit_code, 0) << one.err;
    }
    RunResult two = run("sp2-" + name, 2, args + sp);
    ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
    expect_same("sp2-" + name, against);
  };
  RunResult r = run("sp2", 2, sp + "--set train.batch_size=2");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("groups of 2 tensor-parallel ranks (sequence-parallel); global batch 2"),
            std::string::npos)
      << r.out;
  expect_same("sp2", reference(1));
  // Its collectives per step, exactly as lmforge plan counts them (a rank's 1 row).
  const ModelConfig c = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2"));
  const std::vector<double> mib = losses("sp2", "tp_comm_mib");
  EXPECT_EQ(mib.size(), 6u);
  for (double m : mib)
    EXPECT_DOUBLE_EQ(m * 1048576.0,
                     tensor_parallel_traffic_bytes(
                         c, 1, 32, 2, 1, {.sequence_parallel = true, .vocab_parallel = true}));

  // 2 groups of 2; full activation checkpointing (its forward gathers and sums again) with
  // gradient accumulation.
  RunResult d = run("sp4", 4, sp + "--set train.batch_size=2");
  ASSERT_EQ(d.exit_code, 0) << d.out << d.err;
  expect_same("sp4", reference(2));
  RunResult f = run("sp2-full", 2,
                    sp + "--set train.batch_size=2 --set train.grad_accum=2 --set "
                         "train.activation_checkpointing=full");
  ASSERT_EQ(f.exit_code, 0) << f.out << f.err;
  expect_same("sp2-full", reference(2));
  for (double m : losses("sp2-full", "tp_comm_mib"))
    EXPECT_DOUBLE_EQ(m * 1048576.0, tensor_parallel_traffic_bytes(c, 1, 32, 2, 2,
                                                                  {.full_recompute = true,
                                                                   .sequence_parallel = true,
                                                                   .vocab_parallel = true}));

  // Llama (GQA, RoPE, SwiGLU) in bf16 (its norms' outputs gathered in bf16) against one process
  // in bf16, whose branches are rounded to bf16 where the partial sums stay fp32.
  const std::string llama =
      "--set model.preset=llama3-tiny --set train.lr=1e-3 --set train.precision=bf16 "
      "--set train.batch_size=4 ";
  RunResult one = run("ref-llama-bf16", 1, llama);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  RunResult l = run("sp2-llama-bf16", 2, llama + sp);
  ASSERT_EQ(l.exit_code, 0) << l.out << l.err;
  std::vector<double> a = losses("sp2-llama-bf16"), b = losses("ref-llama-bf16");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-3 * b[i]) << "step " << i + 1;
  const ModelConfig lc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2-llama-bf16"));
  for (double m : losses("sp2-llama-bf16", "tp_comm_mib"))
    EXPECT_DOUBLE_EQ(m * 1048576.0,
                     tensor_parallel_traffic_bytes(
                         lc, 2, 32, 2, 1,
                         {.sequence_parallel = true, .bf16_inputs = true, .vocab_parallel = true}));

  // LoRA (the adapters' products x A^T on the group's rows; the replicated factors' partial
  // gradients summed over the group) with Llama's q/k norms, against one process.
  const std::string lora =
      "--set model.preset=llama3-tiny --set model.qk_norm=true --set train.lr=1e-3 --set "
      "train.batch_size=2 --set model.lora_rank=4 ";
  sp_like_one_process("lora", lora);

  // Distillation: the teacher (sp2's model), whole on every rank, scores each rank's own rows.
  const std::string distill =
      "--set train.batch_size=2 --set model.n_layer=2 --set "
      "train.objective=distill --set train.teacher=" +
      *dir_ + "/sp2 ";
  sp_like_one_process("distill", distill);
  {  // the KL term, summed over the group's rows
    const std::vector<double> a = losses("sp2-distill", "kl"), b = losses("ref-sp-distill", "kl");
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5 * b[i]) << "kl " << i + 1;
  }

  // Packed rows (best-fit: several short documents a row, each attending to itself with its own
  // positions): the group's position ids and document starts gathered for attention and RoPE,
  // each rank's own for the learned positions; GPT-2 and Llama against one process.
  {
    std::ofstream f(*dir_ + "/docs.txt");
    std::mt19937 rng(7);
    const char* words[] = {"and", "the", "light", "was", "good", "in", "beginning", "God"};
    for (int d = 0; d < 300; ++d) {
      const int n = 2 + static_cast<int>(rng() % 7);
      for (int w = 0; w < n; ++w) f << (w ? " " : "") << words[rng() % 8];
      f << "\n\n";
    }
  }
  RunResult pr = testing::run_lmforge(
      "prepare --input docs.txt --output docs --text-mode blank_line --val-fraction 0", *dir_);
  ASSERT_EQ(pr.exit_code, 0) << pr.err;
  const std::string packed =
      "--set data.text= --set data.tokenizer=byte --set model.vocab_size=0 --set "
      "data.train=docs/data --set data.packing=best_fit --set train.batch_size=2 ";
  // sp_like_one_process, and the traffic as counted, the positions' gathers included.
  auto packed_run = [&](const std::string& name, const std::string& args,
                        const std::string& against = "") {
    sp_like_one_process(name, args, against);
    const ModelConfig pc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2-" + name));
    for (double mb : losses("sp2-" + name, "tp_comm_mib"))
      EXPECT_DOUBLE_EQ(mb * 1048576.0,
                       tensor_parallel_traffic_bytes(pc, 1, 32, 2, 1,
                                                     {.sequence_parallel = true,
                                                      .vocab_parallel = pc.vocab_size % 2 == 0,
                                                      .packed_rows = true}))
          << name;
  };
  packed_run("packed-gpt2", packed);
  // (an odd vocabulary: not split, each rank embedding its own rows with its own position ids)
  packed_run("packed-gpt2-odd", packed + "--set model.vocab_size=257 ");
  // Llama (RoPE at the packed positions): sequence parallelism against tensor parallelism alone
  // (the same sums, gathered instead: equal to rounding), and that against one process. Tensor
  // parallelism's partial sums round differently from one process, and on these packed rows
  // AdamW magnifies it to ~1.5e-5 of the loss by step 3 (the same for both; over 40 steps of
  // batch 4 they stay within 2e-5 of one process's losses, down to 0.93, where a wrong position
  // or document start would show), so that comparison gets 1e-4.
  const std::string packed_llama = packed + "--set model.preset=llama3-tiny ";
  RunResult l1 = run("ref-packed-llama", 1, packed_llama);
  ASSERT_EQ(l1.exit_code, 0) << l1.err;
  EXPECT_NE(l1.out.find("cut by packing"), std::string::npos) << l1.out;  // (packed, really)
  RunResult lt = run("tp2-packed-llama", 2, packed_llama + "--set dist.tensor_parallel=2");
  ASSERT_EQ(lt.exit_code, 0) << lt.out << lt.err;
  packed_run("packed-llama", packed_llama, "tp2-packed-llama");
  {
    const std::vector<double> a = losses("tp2-packed-llama"), b = losses("ref-packed-llama");
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_NEAR(a[i], b[i], 1e-4 * b[i]) << "tp2 packed llama, step " << i + 1;
  }

  // Validation: each rank scores its 1/N of every batch, the loss summed over the group: one
  // process's over the same rows.
  const std::string eval =
      "--set train.batch_size=2 --set train.eval_every=3 --set "
      "train.eval_batches=5 --set train.steps=3 ";
  RunResult ve = run("sp2-eval", 2, sp + eval);
  ASSERT_EQ(ve.exit_code, 0) << ve.out << ve.err;
  RunResult vo = run("ref-eval", 1, eval);
  ASSERT_EQ(vo.exit_code, 0) << vo.err;
  const std::vector<double> va = losses("sp2-eval", "val_loss"),
                            vb = losses("ref-eval", "val_loss");
  ASSERT_EQ(va.size(), 1u);
  ASSERT_EQ(vb.size(), 1u);
  EXPECT_NEAR(va[0], vb[0], 1e-6 * vb[0]);

  // Masked targets (SFT): rows whose tokens are all prompt have none, so a rank's loss scale
  // can be 0 for its own rows while its columns of the vocabulary still score the others'.
  {
    std::ofstream f(*dir_ + "/chat.jsonl");
    for (int i = 0; i < 24; ++i) {
      std::string user = "Verse " + std::to_string(i);
      for (int w = 0; w < (i % 2 ? 40 : 2); ++w) user += " and the earth was";
      f << nlohmann::json({{"messages",
                            {{{"role", "user"}, {"content", user}},
                             {{"role", "assistant"}, {"content", "Amen, so be it."}}}}})
               .dump()
        << "\n";
    }
  }
  const std::string llama3 = testing::shared_tokenizers_dir() + "/llama3.tiktoken";
  RunResult pc =
      testing::run_lmforge("prepare --input chat.jsonl --output chat --tokenizer " + llama3 +
                               " --format chat --chat-template llama3 "
                               "--val-docs 0",
                           *dir_);
  ASSERT_EQ(pc.exit_code, 0) << pc.err;
  const std::string chat =
      "--set data.text= --set data.tokenizer=" + llama3 +
      " --set model.vocab_size=0 --set data.train=chat/data --set train.batch_size=2 ";
  RunResult mo = run("ref-masked", 1, chat);
  ASSERT_EQ(mo.exit_code, 0) << mo.out << mo.err;
  RunResult ms = run("sp2-masked", 2, chat + sp);
  ASSERT_EQ(ms.exit_code, 0) << ms.out << ms.err;
  expect_same("sp2-masked", "ref-masked");

  // A resume is bit-exact.
  RunResult k = run("sp-ckpt", 2,
                    sp + "--set train.batch_size=2 --set train.checkpoint_every=3 --set "
                         "train.keep_last=0");
  ASSERT_EQ(k.exit_code, 0) << k.out << k.err;
  RunResult again =
      run("sp-resume", 2,
          sp + "--set train.batch_size=2 --resume=" + *dir_ + "/sp-ckpt/checkpoints/step-00000003");
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  const std::vector<double> whole = losses("sp-ckpt"), rest = losses("sp-resume");
  ASSERT_EQ(rest.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(rest[i], whole[3 + i]) << "step " << 4 + i;
  EXPECT_EQ(params("sp-resume"), params("sp-ckpt"));
}

// The preference objectives under sequence parallelism: each rank scores its own pairs (KTO: its
// labelled rows) with the policy and the reference, its group's KL rows made from the group's
// gathered tokens, the terms summed over the group; each rank's columns of the vocabulary weigh
// the group's rows by their ranks' weights. The same training as tensor parallelism alone, and
// as one process with the group's batch (to the tolerance TP's partial sums need under DPO's
// sigmoid: DpoOnEveryStrategyMatchesOneProcess).
TEST_F(DataParallelTest, SequenceParallelPreferenceObjectivesMatchTensorParallelAlone) {
  {
    std::ofstream f(*dir_ + "/sp-pairs.jsonl");
    for (int i = 0; i < 40; ++i)
      f << nlohmann::json({{"prompt", "Verse " + std::to_string(i) + ": "},
                           {"chosen", i % 3 ? "In the beginning." : "And God said, Let there be."},
                           {"rejected", i % 2 ? "Selah." : "And it was so, and it was good."}})
               .dump()
        << "\n";
    std::ofstream g(*dir_ + "/sp-labelled.jsonl");
    for (int i = 0; i < 40; ++i)
      g << nlohmann::json({{"prompt", "Verse " + std::to_string(i % 7) + ": "},
                           {"completion", i % 3 ? "In the beginning." : "Selah."},
                           {"label", i % 3 != 0}})
               .dump()
        << "\n";
  }
  for (const char* prep : {"prepare --input sp-pairs.jsonl --output sp-prefs --format preference "
                           "--val-fraction 0.2",
                           "prepare --input sp-labelled.jsonl --output sp-labelled --format "
                           "unpaired --val-fraction 0.2"}) {
    RunResult p = testing::run_lmforge(prep, *dir_);
    ASSERT_EQ(p.exit_code, 0) << p.err;
  }
  const std::string byte =
      "--set data.text= --set data.tokenizer=byte --set model.vocab_size=0 --set "
      "train.batch_size=4 ";
  const std::string tp = "--set dist.tensor_parallel=2 ";
  const std::string sp = tp + "--set dist.sequence_parallel=true ";
  struct Case {
    std::string name, args;
    int64_t extra_forwards;
    bool kl_rows;
  };
  const std::string prefs = byte + "--set data.train=sp-prefs/data ";
  for (const Case& c : {
           Case{"dpo", prefs + "--set train.objective=dpo --set train.dpo_beta=0.5 ", 1, false},
           Case{"orpo", prefs + "--set train.objective=orpo ", 0, false},
           Case{"simpo", prefs + "--set train.objective=simpo --set train.cpo_alpha=0.5 ", 0,
                false},
           Case{"kto", byte + "--set data.train=sp-labelled/data --set train.objective=kto ", 3,
                true},
       }) {
    RunResult one = run("pref-one-" + c.name, 1, c.args);
    ASSERT_EQ(one.exit_code, 0) << c.name << "\n" << one.out << one.err;
    RunResult alone = run("pref-tp2-" + c.name, 2, c.args + tp);
    ASSERT_EQ(alone.exit_code, 0) << c.name << "\n" << alone.out << alone.err;
    RunResult two = run("pref-sp2-" + c.name, 2, c.args + sp);
    ASSERT_EQ(two.exit_code, 0) << c.name << "\n" << two.out << two.err;
    expect_same("pref-sp2-" + c.name, "pref-tp2-" + c.name, 1e-5, 1e-5);
    // (ORPO's gradient, through 1 / (1 - e^a) of a response near probability 1, jumps to a norm
    // of ~34 at step 6, where TP's partial sums, alone as with sequence parallelism, are 1.2e-3 of
    // it from one process's)
    expect_same("pref-sp2-" + c.name, "pref-one-" + c.name, 1e-4, c.name == "orpo" ? 3e-3 : 1e-4);
    // The objective's metrics (rewards, margins; KTO's KL estimate) over the group's rows.
    for (const char* key : {"reward_margin", "reward_chosen"}) {
      const std::vector<double> a = losses("pref-sp2-" + c.name, key),
                                b = losses("pref-one-" + c.name, key);
      ASSERT_EQ(a.size(), b.size()) << c.name << " " << key;
      for (size_t i = 0; i < a.size(); ++i)
        EXPECT_NEAR(a[i], b[i], 1e-4 * std::abs(b[i]) + 1e-7) << c.name << " " << key << " " << i;
    }
    // The partial sums, gathers and scatters as lmforge plan counts them (a rank's 2 rows).
    const ModelConfig mc =
        checkpoint_model_config(find_latest_checkpoint(*dir_ + "/pref-sp2-" + c.name));
    const double planned = tensor_parallel_traffic_bytes(mc, 2, 32, 2, 1,
                                                         {.sequence_parallel = true,
                                                          .extra_forwards = c.extra_forwards,
                                                          .kl_rows = c.kl_rows,
                                                          .vocab_parallel = true,
                                                          .rows_weighed = true});
    const std::vector<double> mib = losses("pref-sp2-" + c.name, "tp_comm_mib");
    ASSERT_EQ(mib.size(), 6u) << c.name;
    for (double m : mib) EXPECT_DOUBLE_EQ(m * 1048576.0, planned) << c.name;
  }
  const std::string dpo = prefs + "--set train.objective=dpo --set train.dpo_beta=0.5 ";
  // The reference's log-likelihoods precomputed, 2 groups of 2 (full-shard across them): each
  // group scores every other group batch, each rank its own rows of it; the same values as the
  // reference's forwards in the steps give. (Against one process: this run's DPO saturates, its
  // loss ~6e-5 by step 4, where TP's roundings show at ~1e-4 of it.)
  const std::string sp4 = dpo + sp + "--set dist.strategy=full-shard ";
  RunResult in_step = run("pref-sp4", 4, sp4);
  ASSERT_EQ(in_step.exit_code, 0) << in_step.out << in_step.err;
  RunResult pre = run("pref-sp4-pre", 4, sp4 + "--set train.precompute_ref_logps=true");
  ASSERT_EQ(pre.exit_code, 0) << pre.out << pre.err;
  expect_same("pref-sp4-pre", "pref-sp4");
  RunResult one4 = run("pref-one-dpo-accum", 1, dpo + "--set train.grad_accum=2");
  ASSERT_EQ(one4.exit_code, 0) << one4.out << one4.err;
  expect_same("pref-sp4", "pref-one-dpo-accum", 1e-3, 1e-4);
  // LoRA: the reference is the policy with its adapters off (the same group's forward).
  const std::string lora = dpo + "--set model.lora_rank=4 --set train.lr=1e-2 ";
  RunResult lo = run("pref-one-lora", 1, lora);
  ASSERT_EQ(lo.exit_code, 0) << lo.out << lo.err;
  RunResult ls = run("pref-sp2-lora", 2, lora + sp);
  ASSERT_EQ(ls.exit_code, 0) << ls.out << ls.err;
  expect_same("pref-sp2-lora", "pref-one-lora", 1e-4, 1e-4);
  // Validation: each rank scores its rows of every group batch, the sums over the group.
  for (const Case& c : {Case{"dpo", dpo + "--set data.val=sp-prefs/data ", 0, false},
                        Case{"kto",
                             byte + "--set data.train=sp-labelled/data --set "
                                    "data.val=sp-labelled/data --set train.objective=kto ",
                             0, false}}) {
    const std::string args = c.args + "--set train.eval_every=3 --set train.eval_batches=3 ";
    RunResult a = run("pref-eval-one-" + c.name, 1, args);
    ASSERT_EQ(a.exit_code, 0) << a.out << a.err;
    RunResult b = run("pref-eval-sp2-" + c.name, 2, args + sp);
    ASSERT_EQ(b.exit_code, 0) << b.out << b.err;
    for (const char* key : {"val_loss", "val_reward_margin"}) {
      const std::vector<double> va = losses("pref-eval-sp2-" + c.name, key),
                                vb = losses("pref-eval-one-" + c.name, key);
      ASSERT_EQ(va.size(), 2u) << c.name << " " << key;
      ASSERT_EQ(vb.size(), 2u) << c.name << " " << key;
      for (size_t i = 0; i < 2; ++i)
        EXPECT_NEAR(va[i], vb[i], 1e-4 * std::abs(vb[i]) + 1e-7) << c.name << " " << key;
    }
  }
  // A pair's two rows stay on one rank.
  RunResult odd = run("pref-odd", 2, dpo + sp + "--set train.batch_size=2");
  EXPECT_NE(odd.exit_code, 0);
  EXPECT_NE(odd.err.find("a preference pair takes two rows of one rank; choose a multiple of 4"),
            std::string::npos)
      << odd.err;
}

TEST_F(DataParallelTest, TensorParallelRefusesWhatItCannotSplit) {
  struct Case {
    int ranks;
    std::string extra, message;
  };
  for (const Case& c :
       {Case{1, "--set dist.tensor_parallel=2", "does not divide the 1 ranks launched"},
        Case{1, "--set dist.tensor_parallel=2 --set dist.offload=true",
             "dist.offload is not supported with tensor parallelism"},
        Case{4, "--set dist.tensor_parallel=4 --set model.preset=llama3-tiny",
             "does not divide the model's key/value heads (model.n_kv_head) (2)"},
        Case{1, "--set dist.sequence_parallel=true",
             "dist.sequence_parallel: splits the rows of a tensor-parallel group"},
        Case{2,
             "--set dist.tensor_parallel=2 --set dist.sequence_parallel=true --set "
             "train.batch_size=3",
             "train.batch_size: 3 rows do not split over the 2 ranks"}}) {
    RunResult r = run("tp-refused", c.ranks, c.extra);
    EXPECT_NE(r.exit_code, 0) << c.extra;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.extra << "\n" << r.err;
    EXPECT_FALSE(std::filesystem::exists(*dir_ + "/tp-refused")) << c.extra;
  }
}

TEST_F(DataParallelTest, ADeadOrHungRankStopsTheJobNamingIt) {
  RunResult k = run("kill", 2, "--set train.batch_size=2 --set train.inject_fault=kill@3");
  EXPECT_NE(k.exit_code, 0);
  EXPECT_NE((k.out + k.err).find("rank 1"), std::string::npos) << k.out << k.err;

  testing::expect_hung_rank_named(run("hang", 2, testing::kHangAtStep3));
}

}  // namespace
}  // namespace lmforge
