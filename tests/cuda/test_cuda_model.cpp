// The whole model on the GPU (train.device: cuda) against the same model on the CPU: logits, loss
// and every parameter gradient of gpt2-tiny, llama3-tiny and the same with Qwen3's q/k norms, AdamW
// steps through DataParallel, and the CLI's training, checkpoints and resume on the GPU. Every test
// skips without a GPU.
//
// Tolerances (relative to the largest reference magnitude, testing/compare.h): fp32 1e-4 for
// logits and gradients (cuBLASLt's fp32 GEMMs sum in another order than oneDNN's; no TF32), bf16
// 2e-2 (both sides round the matmul inputs to bf16, but the GEMMs accumulate in other orders).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <random>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/profile.h"
#include "lmforge/data/loader.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"
#include "testing/compare.h"
#include "testing/metrics.h"

namespace lmforge {
namespace {

using testing::tensors_close;

constexpr int64_t kB = 2, kT = 32;

// "qwen3-tiny": llama3-tiny with Qwen3's q/k norms.
ModelConfig tiny(const std::string& preset) {
  const bool qwen3 = preset == "qwen3-tiny";
  ModelConfig c = model_preset(qwen3 ? "llama3-tiny" : preset);
  c.qk_norm = qwen3;
  // Small, and not a multiple of 4: the LM head's padded rows on the GPU (logits to 324 columns,
  // bf16 dlogits to 328) are part of every comparison.
  c.vocab_size = 322;
  c.max_seq_len = 64;
  return c;
}

Batch random_batch(int64_t V, uint32_t seed, bool with_ignored = true) {
  Batch b = Batch::make(kB, kT);
  std::mt19937 rng(seed);
  for (int64_t i = 0; i < kB * kT; ++i) {
    b.tokens.data<int32_t>()[i] = static_cast<int32_t>(rng() % V);
    b.targets.data<int32_t>()[i] = static_cast<int32_t>(rng() % V);
  }
  if (with_ignored) b.targets.data<int32_t>()[5] = -100;
  return b;
}

Tensor host(const Tensor& t) { return t.device() == Device::kCPU ? t : t.to(Device::kCPU); }

struct Pair {
  Transformer cpu, gpu;
  explicit Pair(const ModelConfig& c, bool bf16) : cpu(c), gpu(c) {
    cpu.init_weights(7);
    gpu.init_weights(7);
    gpu.to(Device::kCUDA);
    if (bf16) {
      cpu.enable_bf16();
      gpu.enable_bf16();
    }
  }
};

class CudaModel : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(CudaModel, LogitsLossAndGradientsMatchTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const auto& [preset, bf16] = GetParam();
  const double tol = bf16 ? 2e-2 : 1e-4;
  ModelConfig c = tiny(preset);
  Pair m(c, bf16);
  ASSERT_EQ(m.gpu.device(), Device::kCUDA);
  ASSERT_EQ(m.gpu.params().params().front().value.device(), Device::kCUDA);
  Batch b = random_batch(c.vocab_size, 11);

  // Logits (inference plan), then loss and gradients (training plan).
  m.cpu.plan(kB, kT, Recompute::kNone, /*keep_logits=*/true);
  m.gpu.plan(kB, kT, Recompute::kNone, /*keep_logits=*/true);
  m.cpu.forward(b.tokens, Tensor());
  m.gpu.forward(b.tokens, Tensor());
  EXPECT_TRUE(tensors_close("logits", host(m.gpu.logits()), m.cpu.logits(), tol));

  m.cpu.plan(kB, kT);
  m.gpu.plan(kB, kT);
  // The loss alone (evaluation) through the training plan's LM-head chunks (padded rows on the
  // GPU under bf16).
  const float ec = m.cpu.forward(b.tokens, b.targets), eg = m.gpu.forward(b.tokens, b.targets);
  EXPECT_NEAR(eg, ec, tol * std::fabs(ec)) << preset << " (evaluation)";
  m.cpu.params().zero_grad();
  m.gpu.params().zero_grad();
  const float lc = m.cpu.forward_backward(b.tokens, b.targets);
  const float lg = m.gpu.forward_backward(b.tokens, b.targets);
  EXPECT_NEAR(lg, lc, tol * std::fabs(lc)) << preset;
  EXPECT_EQ(m.gpu.target_count(), m.cpu.target_count());
  auto& pc = m.cpu.params().params();
  auto& pg = m.gpu.params().params();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i)
    EXPECT_TRUE(tensors_close("grad " + pc[i].name, host(pg[i].grad), pc[i].grad, tol));
}

// Packed rows (doc_ids): per-document positions and attention on the GPU as on the CPU (the
// fp32 attention kernel there: cuDNN's takes no document starts).
TEST_P(CudaModel, PackedRowsMatchTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const auto& [preset, bf16] = GetParam();
  const double tol = bf16 ? 2e-2 : 1e-4;
  ModelConfig c = tiny(preset);
  Pair m(c, bf16);
  Batch b = random_batch(c.vocab_size, 17);
  const int64_t lengths[] = {5, 1, 9, 14};
  for (int64_t r = 0; r < kB; ++r)
    for (int64_t t = 0, k = r, d = 0; t < kT; ++k, ++d)
      for (int64_t i = 0; i < lengths[k % 4] && t < kT; ++i, ++t) {
        b.doc_ids.data<int32_t>()[r * kT + t] = static_cast<int32_t>(d);
        if (i == 0 && t > 0) b.targets.data<int32_t>()[r * kT + t - 1] = -100;  // doc's last
      }
  m.cpu.plan(kB, kT);
  m.gpu.plan(kB, kT);
  m.cpu.params().zero_grad();
  m.gpu.params().zero_grad();
  const float lc = m.cpu.forward_backward(b.tokens, b.targets, 1.0, -100, b.doc_ids);
  const float lg = m.gpu.forward_backward(b.tokens, b.targets, 1.0, -100, b.doc_ids);
  EXPECT_NEAR(lg, lc, tol * std::fabs(lc)) << preset;
  const float plain = m.cpu.forward(b.tokens, b.targets);
  EXPECT_GT(std::fabs(plain - lc), 1e-4) << "doc_ids must change the loss";
  auto& pc = m.cpu.params().params();
  auto& pg = m.gpu.params().params();
  for (size_t i = 0; i < pc.size(); ++i)
    EXPECT_TRUE(tensors_close("grad " + pc[i].name, host(pg[i].grad), pc[i].grad, tol));
}

// Activation checkpointing recomputes on the GPU as on the CPU: the same gradients.
TEST_P(CudaModel, RecomputeGivesIdenticalGradients) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const auto& [preset, bf16] = GetParam();
  ModelConfig c = tiny(preset);
  Transformer a(c), r(c);
  a.init_weights(3);
  r.init_weights(3);
  a.to(Device::kCUDA);
  r.to(Device::kCUDA);
  if (bf16) a.enable_bf16(), r.enable_bf16();
  a.plan(kB, kT);
  r.plan(kB, kT, Recompute::kFull);
  Batch b = random_batch(c.vocab_size, 5);
  a.params().zero_grad();
  r.params().zero_grad();
  const float la = a.forward_backward(b.tokens, b.targets),
              lr = r.forward_backward(b.tokens, b.targets);
  EXPECT_NEAR(lr, la, 1e-6 * std::fabs(la))
      << "the same forward (up to cuBLASLt's algorithm choice)";
  EXPECT_TRUE(
      tensors_close("grads", host(r.params().flat_grads()), host(a.params().flat_grads()), 1e-5))
      << "same kernels on the same values; cuBLASLt may pick another algorithm for the other "
         "layout's pointer alignment, hence not 0";
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaModel,
                         ::testing::Combine(::testing::Values("gpt2-tiny", "llama3-tiny",
                                                              "qwen3-tiny"),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param);
                           for (char& ch : n)
                             if (ch == '-' || ch == '.') ch = '_';
                           return n + (std::get<1>(info.param) ? "_bf16" : "_fp32");
                         });

// Twenty AdamW steps (two micro-batches each, clipping) through DataParallel on one process:
// the losses and final parameters track the CPU's. With `muon`, the blocks' matrices step with
// Muon (its Newton-Schulz products through cuBLASLt there).
void optimizer_steps_track_the_cpu(bool muon) {
  ModelConfig c = tiny("llama3-tiny");
  Pair m(c, /*bf16=*/false);
  m.cpu.plan(kB, kT);
  m.gpu.plan(kB, kT);
  dist::LocalCommunicator one_cpu, one_gpu;
  DistConfig dc;
  AdamWOptions ao{0.9, 0.95, 1e-8, 0.1};
  ao.muon.on = muon;
  dist::DataParallel dp_cpu(one_cpu, m.cpu, dc, ao), dp_gpu(one_gpu, m.gpu, dc, ao);
  ASSERT_EQ(dp_gpu.optimizer().m(0).device(), Device::kCUDA);
  for (int step = 0; step < 20; ++step) {
    std::vector<Batch> micro{random_batch(c.vocab_size, 100 + 2 * step),
                             random_batch(c.vocab_size, 101 + 2 * step)};
    double lc = dp_cpu.forward_backward(micro), lg = dp_gpu.forward_backward(micro);
    double nc = dp_cpu.clip_grad_norm(1.0), ng = dp_gpu.clip_grad_norm(1.0);
    EXPECT_NEAR(lg, lc, 1e-4 * lc) << "step " << step;
    EXPECT_NEAR(ng, nc, 1e-4 * nc) << "step " << step;
    dp_cpu.step(1e-3);
    dp_gpu.step(1e-3);
  }
  // AdamW moves each weight by about lr * sign(m): an element whose gradient is within rounding of
  // zero may step the other way, so the bound is a few learning rates (1e-3), not rounding.
  EXPECT_TRUE(tensors_close("parameters after 20 steps", host(m.gpu.params().flat_values()),
                            m.cpu.params().flat_values(), 5e-3));
}

TEST(CudaTraining, AdamWStepsTrackTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  optimizer_steps_track_the_cpu(/*muon=*/false);
}

TEST(CudaTraining, MuonStepsTrackTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  optimizer_steps_track_the_cpu(/*muon=*/true);
}

// train.master_weights: bf16 on the GPU: the weights live on the device in bf16, the update rounds
// them stochastically there, and ten steps track the CPU's (bf16 tolerance: cuDNN's bf16 attention
// against the CPU's fp32 kernel, and roundings that may go the other way near a tie).
TEST(CudaTraining, Bf16MasterWeightsTrackTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  ModelConfig c = tiny("llama3-tiny");
  Pair m(c, /*bf16=*/true);
  m.cpu.use_bf16_master();
  m.gpu.use_bf16_master();
  ASSERT_EQ(m.gpu.params().flat_values().dtype(), DType::kBF16);
  ASSERT_EQ(m.gpu.params().flat_values().device(), Device::kCUDA);
  m.cpu.plan(kB, kT);
  m.gpu.plan(kB, kT);
  dist::LocalCommunicator one_cpu, one_gpu;
  DistConfig dc;
  AdamWOptions ao{0.9, 0.95, 1e-8, 0.1, /*seed=*/5};
  dist::DataParallel dp_cpu(one_cpu, m.cpu, dc, ao), dp_gpu(one_gpu, m.gpu, dc, ao);
  for (int step = 0; step < 10; ++step) {
    std::vector<Batch> micro{random_batch(c.vocab_size, 300 + step)};
    double lc = dp_cpu.forward_backward(micro), lg = dp_gpu.forward_backward(micro);
    EXPECT_NEAR(lg, lc, 2e-2 * lc) << "step " << step;
    dp_cpu.clip_grad_norm(1.0);
    dp_gpu.clip_grad_norm(1.0);
    dp_cpu.step(1e-3);
    dp_gpu.step(1e-3);
  }
  EXPECT_TRUE(tensors_close("bf16 master weights after 10 steps",
                            host(m.gpu.params().flat_values()).to(DType::kF32),
                            m.cpu.params().flat_values().to(DType::kF32), 2e-2));
  // Back on the host (as a run does to sample at its end): the bf16 masters and their fp32
  // working copies come along, and the model evaluates as the CPU's does.
  m.gpu.to(Device::kCPU);
  m.gpu.plan(kB, kT);
  const Batch b = random_batch(c.vocab_size, 999);
  const float lc = m.cpu.forward(b.tokens, b.targets), lg = m.gpu.forward(b.tokens, b.targets);
  EXPECT_NEAR(lg, lc, 2e-2 * lc);
}

// train.cuda_graphs: the step captured once and replayed gives the eager step's losses and
// parameters bit for bit (the same kernels on the same buffers), for GPT-2 and Llama shapes, bf16,
// with activation checkpointing, over steps whose loss scale changes (a step with an ignored
// target runs eagerly and the next recaptures), and the graph is really replayed.
TEST(CudaTraining, CudaGraphStepsAreBitIdenticalToEagerSteps) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  for (const auto& [preset, recompute] : {std::pair{"gpt2-tiny", Recompute::kNone},
                                          std::pair{"llama3-tiny", Recompute::kSelective}}) {
    SCOPED_TRACE(preset);
    ModelConfig c = tiny(preset);
    Transformer eager(c), graphed(c);
    for (Transformer* m : {&eager, &graphed}) {
      m->init_weights(11);
      m->to(Device::kCUDA);
      m->enable_bf16();
      m->plan(kB, kT, recompute);
    }
    graphed.set_cuda_graphs(true);
    graphed.plan(kB, kT, recompute);
    dist::LocalCommunicator one_e, one_g;
    DistConfig dc;
    AdamWOptions ao{0.9, 0.95, 1e-8, 0.1};
    dist::DataParallel dp_e(one_e, eager, dc, ao), dp_g(one_g, graphed, dc, ao);
    for (int step = 0; step < 8; ++step) {
      const bool ignored = step == 4;  // a new loss scale: eager, then captured again
      std::vector<Batch> micro{random_batch(c.vocab_size, 700 + 2 * step, ignored),
                               random_batch(c.vocab_size, 701 + 2 * step, ignored)};
      const double le = dp_e.forward_backward(micro), lg = dp_g.forward_backward(micro);
      EXPECT_EQ(lg, le) << "step " << step;
      EXPECT_EQ(dp_g.clip_grad_norm(1.0), dp_e.clip_grad_norm(1.0)) << "step " << step;
      dp_e.step(1e-3);
      dp_g.step(1e-3);
    }
    // 16 micro-batches: the first runs eagerly, the second is captured and every later one with
    // the same loss scale replays (or recaptures, after a scratch buffer was regrown); the first
    // of step 4 (a new scale) and of step 5 (the old one back) run eagerly: 13 through a graph.
    EXPECT_EQ(graphed.graph_launches(), 13);
    // Captured at step 0 (second micro-batch), step 4 and step 5, plus a recapture after each
    // scratch buffer that grew (in the first optimizer step, say; the two models share them):
    // replays, not a capture per call.
    EXPECT_GE(graphed.graph_captures(), 3);
    EXPECT_LE(graphed.graph_captures(), 6);
    EXPECT_EQ(eager.graph_launches(), 0);
    EXPECT_TRUE(tensors_close("parameters after 8 graphed steps",
                              host(graphed.params().flat_values()),
                              host(eager.params().flat_values()), 0.0));
  }
}

// The op-level profile on the GPU: every op of the step is timed by CUDA events (rows marked
// gpu), the same calls as on the CPU, and the times resolve to no more than the steps' wall time.
TEST(CudaProfile, TimesTheStepsOpsWithEvents) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  Pair m(tiny("gpt2-tiny"), /*bf16=*/true);
  Batch b = random_batch(m.gpu.config().vocab_size, 5);
  m.gpu.plan(kB, kT);
  m.gpu.forward_backward(b.tokens, b.targets);  // warm-up: plans and scratch
  cuda::synchronize();
  profile::enable(true);
  auto t0 = std::chrono::steady_clock::now();
  m.gpu.params().zero_grad();
  m.gpu.forward_backward(b.tokens, b.targets);
  cuda::synchronize();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::vector<profile::Row> rows = profile::rows();
  profile::enable(false);
  int64_t linear = 0;
  double in_ops = 0;
  for (const profile::Row& r : rows) {
    if (r.op == "copy_to_gpu" || r.op == "copy_to_host") continue;
    EXPECT_TRUE(r.gpu) << r.op;
    EXPECT_GT(r.seconds, 0) << r.op;
    in_ops += r.seconds;
    if (r.op == "linear_forward_bf16") linear += r.calls;
  }
  const int64_t L = m.gpu.config().n_layer, R = m.gpu.logits_chunk_rows();
  EXPECT_EQ(linear, 4 * L + (kB * kT + R - 1) / R);
  EXPECT_LE(in_ops, wall);
}

// gpt2-tiny on the demo corpus, byte tokens (the CLI runs below add steps, device, run.dir).
constexpr const char* kDemoRun =
    "train --set model.preset=gpt2-tiny --set model.vocab_size=257 --set model.max_seq_len=64 "
    "--set data.text=demo:kjv --set data.tokenizer=byte --set train.batch_size=8 "
    "--set train.seq_len=64 ";

// The CLI on the GPU: a run saves checkpoints, resuming from one continues bit-exactly (the
// kernels are deterministic), and the loss curve stays within 2% of the CPU's over 300 steps of
// the demo corpus; the run reports GPU memory and samples (on the CPU) at the end; with
// train.cuda_graphs the run is the same bit for bit.
TEST(CudaTraining, CliRunResumesExactlyAndTracksTheCpu) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const std::string dir = testing::temp_dir("cuda-train");
  const std::string common = std::string(kDemoRun) +
                             "--set train.lr=2e-3 --set train.min_lr=2e-4 --set train.warmup=20 "
                             "--set sample.max_tokens=16 --set sample.prompt=In ";
  auto loss_of = [&](const std::string& run) {
    std::map<int64_t, double> out;
    for (auto& j : testing::records_of(dir + "/" + run + "/metrics.jsonl", "loss"))
      out[j["step"].get<int64_t>()] = j["loss"].get<double>();
    return out;
  };
  auto r = testing::run_lmforge(
      common + "--set train.steps=300 --set train.device=cpu " + "--set run.dir=cpu", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = testing::run_lmforge(common + "--set train.steps=300 --set train.device=cuda " +
                               "--set train.checkpoint_every=100 --set run.dir=gpu",
                           dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("device: cuda"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("peak GPU memory"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--- sample ---"), std::string::npos) << r.out;
  auto cpu = loss_of("cpu"), gpu = loss_of("gpu");
  ASSERT_EQ(gpu.size(), 300u);
  ASSERT_EQ(cpu.size(), 300u);
  double tail_cpu = 0, tail_gpu = 0;  // the mean of the last 20 steps' losses
  for (int64_t s = 281; s <= 300; ++s) tail_cpu += cpu[s] / 20, tail_gpu += gpu[s] / 20;
  EXPECT_NEAR(tail_gpu, tail_cpu, 0.02 * tail_cpu);
  for (int64_t s = 1; s <= 10; ++s) EXPECT_NEAR(gpu[s], cpu[s], 1e-3 * cpu[s]) << "step " << s;

  // Resume the GPU run from step 200 into a copy of its directory: steps 201..300 again.
  std::filesystem::copy(dir + "/gpu", dir + "/resumed", std::filesystem::copy_options::recursive);
  r = testing::run_lmforge(common + "--set train.steps=300 --set train.device=cuda " +
                               "--set train.checkpoint_every=100 --set run.dir=resumed " +
                               "--resume=resumed/checkpoints/step-00000200",
                           dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto resumed = loss_of("resumed");
  for (int64_t s = 201; s <= 300; ++s) EXPECT_EQ(resumed[s], gpu[s]) << "step " << s;

  // train.cuda_graphs: the same run with the step replayed from a CUDA graph, bit for bit.
  r = testing::run_lmforge(common + "--set train.steps=300 --set train.device=cuda " +
                               "--set train.cuda_graphs=true --set run.dir=graphs",
                           dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("could not be captured"), std::string::npos) << r.err;
  auto graphs = loss_of("graphs");
  ASSERT_EQ(graphs.size(), 300u);
  for (int64_t s = 1; s <= 300; ++s) EXPECT_EQ(graphs[s], gpu[s]) << "step " << s;
}

// dist.backend: nccl on one GPU: the gradients and the loss's scalars go through an NCCL world
// of one rank, which must train exactly as the plain single-GPU run does; bootstrapped through the
// host world, and as a torchrun launch of one rank (the world itself NCCL, made by
// make_nccl_world_tcp, which also carries the run directory's barriers; one rank needs no TCP
// rendezvous, so that part is tested only by test_nccl's threads).
TEST(CudaTraining, NcclWorldOfOneTrainsAsOneProcess) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
#ifndef LMFORGE_HAVE_NCCL
  GTEST_SKIP() << "built without NCCL";
#endif
  const std::string dir = testing::temp_dir("cuda-nccl1");
  const std::string common = std::string(kDemoRun) +
                             "--set train.steps=20 --set train.grad_accum=2 "
                             "--set train.device=cuda --set sample.prompt= ";
  for (std::string strategy : {"no-shard", "full-shard"}) {
    auto plain = testing::run_lmforge(
        common + "--set dist.strategy=" + strategy + " --set run.dir=plain-" + strategy, dir);
    ASSERT_EQ(plain.exit_code, 0) << plain.err;
    auto nccl = testing::run_lmforge(common + "--set dist.strategy=" + strategy +
                                         " --set dist.backend=nccl --set run.dir=nccl-" + strategy,
                                     dir);
    ASSERT_EQ(nccl.exit_code, 0) << nccl.err;
    EXPECT_NE(nccl.out.find("over local (tensors over nccl)"), std::string::npos) << nccl.out;
    auto torchrun =
        testing::run_lmforge(common + "--set dist.strategy=" + strategy +
                                 " --set dist.backend=nccl --set run.dir=torchrun-" + strategy,
                             dir,
                             "env -u OMPI_COMM_WORLD_SIZE -u SLURM_PROCID -u PMI_SIZE WORLD_SIZE=1 "
                             "RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1");
    ASSERT_EQ(torchrun.exit_code, 0) << torchrun.err;
    EXPECT_NE(torchrun.out.find("dist: 1 ranks (1 node(s) x 1) over nccl,"), std::string::npos)
        << torchrun.out;
    auto a = testing::records_of(dir + "/plain-" + strategy + "/metrics.jsonl", "loss");
    for (std::string run : {"nccl-", "torchrun-"}) {
      auto b = testing::records_of(dir + "/" + run + strategy + "/metrics.jsonl", "loss");
      ASSERT_EQ(a.size(), 20u);
      ASSERT_EQ(b.size(), 20u) << run;
      for (size_t i = 0; i < a.size(); ++i) {
        EXPECT_EQ(b[i]["loss"].get<double>(), a[i]["loss"].get<double>()) << run << strategy << i;
        EXPECT_EQ(b[i]["grad_norm"].get<double>(), a[i]["grad_norm"].get<double>()) << run;
      }
    }
  }
}

// dist.offload with one GPU rank: AdamW's state, master values and step move to a host arena (the
// gradients copied down, the values back up each step). The host AdamW and the device kernel do
// the same fp32 arithmetic up to rounding (FMA contraction, sqrt), so the runs track closely, not
// bit for bit: 20 steps within 1e-4 relative.
TEST(CudaTraining, OffloadOnOneGpuTracksTheDeviceStep) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  const std::string dir = testing::temp_dir("cuda-offload1");
  const std::string common =
      std::string(kDemoRun) + "--set train.steps=20 --set train.device=cuda --set sample.prompt= ";
  for (std::string strategy : {"grad-shard", "full-shard"}) {
    auto plain = testing::run_lmforge(
        common + "--set dist.strategy=" + strategy + " --set run.dir=plain-" + strategy, dir);
    ASSERT_EQ(plain.exit_code, 0) << plain.err;
    auto off = testing::run_lmforge(common + "--set dist.strategy=" + strategy +
                                        " --set dist.offload=true --set run.dir=off-" + strategy,
                                    dir);
    ASSERT_EQ(off.exit_code, 0) << off.err;
    EXPECT_NE(off.out.find("dist.offload: AdamW master values and gradients in a host arena"),
              std::string::npos)
        << off.out;
    auto a = testing::records_of(dir + "/plain-" + strategy + "/metrics.jsonl", "loss");
    auto b = testing::records_of(dir + "/off-" + strategy + "/metrics.jsonl", "loss");
    ASSERT_EQ(a.size(), 20u);
    ASSERT_EQ(b.size(), 20u);
    EXPECT_EQ(b[0]["loss"].get<double>(), a[0]["loss"].get<double>()) << strategy;
    for (size_t i = 0; i < a.size(); ++i) {
      const double x = a[i]["loss"].get<double>(), y = b[i]["loss"].get<double>();
      EXPECT_NEAR(y, x, 1e-4 * x) << strategy << " step " << i;
    }
  }
}

}  // namespace
}  // namespace lmforge
