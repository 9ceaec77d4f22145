// The multi-rank training tests' fixture (test_data_parallel, test_tensor_parallel,
// test_sequence_parallel): runs of the tiny training (dist/tiny_run.h) over MPI ranks
// (lmforge launch --nproc N, oversubscribing the 2 cores with one thread per rank) compared
// with one process that sees the same global batch. The reduction orders differ (MPI's sum
// over ranks vs accumulation over micro-batches), so losses must agree to 1e-6 relative
// (gradient norms 1e-5) and final parameters to 1e-5 in relative L2 norm and 1e-3 for any one
// (AdamW can turn a rounding-level difference of a tiny gradient into a sizeable step); the
// tests also report when they are bit-identical. Each including file is its own test binary.
#pragma once

#include <fmt/core.h>
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
// A saturating DPO run's relative loss tolerance: its loss -log sigmoid(m) ~ e^-m falls to ~1e-5,
// where the loss's relative rounding is the margin's absolute rounding (up to ~3e-5 with AVX2's
// matmuls, Zen 3), as is its gradient norm's.
constexpr double kSaturatedDpo = 1e-4;

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
  // loss_rel, norm_rel: the losses' and gradient norms' relative tolerances; param_rel the
  // parameters' (below).
  static bool expect_same(const std::string& name, const std::string& ref, double loss_rel = 1e-6,
                          double norm_rel = 1e-5, double param_rel = 1e-5) {
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
    EXPECT_LE(rel, param_rel) << name;
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
  // A run resumed from `whole`'s step-3 checkpoint: its 3 steps against `whole`'s last 3, the
  // same losses and final parameters exactly, or with rel > 0 losses within rel (a continuation
  // under another layout, as one process).
  static void expect_resumed(const std::string& resumed, const std::string& whole, double rel = 0) {
    const std::vector<double> all = losses(whole), rest = losses(resumed);
    ASSERT_EQ(all.size(), 6u) << whole;
    ASSERT_EQ(rest.size(), 3u) << resumed;
    for (size_t i = 0; i < 3; ++i) {
      if (rel == 0) {
        EXPECT_EQ(rest[i], all[3 + i]) << resumed << ", step " << 4 + i;
      } else {
        EXPECT_NEAR(rest[i], all[3 + i], rel * all[3 + i]) << resumed << ", step " << 4 + i;
      }
    }
    if (rel == 0) {
      EXPECT_EQ(params(resumed), params(whole)) << resumed;
    }
  }
  // Preference data prepared into dir_/<out>/data (and val shards with val_fraction): 40 pairs
  // (prompt, chosen, rejected: --format preference), or with `labelled` 40 replies labelled
  // desirable or not (prompt, completion, label: --format unpaired), their prompts repeating
  // every `prompts`.
  static void prepare_preferences(const std::string& out, bool labelled, int prompts = 40,
                                  double val_fraction = 0) {
    {
      std::ofstream f(*dir_ + "/" + out + ".jsonl");
      for (int i = 0; i < 40; ++i) {
        const std::string prompt = "Verse " + std::to_string(i % prompts) + ": ";
        if (labelled)
          f << nlohmann::json({{"prompt", prompt},
                               {"completion", i % 3 ? "In the beginning." : "Selah."},
                               {"label", i % 3 != 0}})
                   .dump();
        else
          f << nlohmann::json(
                   {{"prompt", prompt},
                    {"chosen", i % 3 ? "In the beginning." : "And God said, Let there be."},
                    {"rejected", i % 2 ? "Selah." : "And it was so, and it was good."}})
                   .dump();
        f << "\n";
      }
    }
    RunResult p = testing::run_lmforge(
        fmt::format("prepare --input {}.jsonl --output {} --format {} --val-fraction {}", out, out,
                    labelled ? "unpaired" : "preference", val_fraction),
        *dir_);
    ASSERT_EQ(p.exit_code, 0) << p.err;
  }
  static inline std::string* dir_ = nullptr;
};

}  // namespace
}  // namespace lmforge
