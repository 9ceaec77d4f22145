// Models in bf16 mixed precision: gpt2-tiny trained in bf16 against the same model in fp32, bf16
// master weights against fp32 masters, the bf16 copies following the weights, and a step that
// allocates nothing after the warm-up.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"

namespace lmforge {
namespace {

struct TrainRun {
  std::vector<float> losses;
  std::vector<float> grads;
};

// gpt2-tiny (with vocabulary V) initialised from `seed`, in bf16 (optionally with bf16 master
// weights) or fp32, planned for (B, T).
std::unique_ptr<Transformer> tiny_model(uint64_t seed, bool bf16, int64_t B, int64_t T,
                                        int64_t V = 97, bool bf16_master = false) {
  ModelConfig cfg = model_preset("gpt2-tiny");
  cfg.vocab_size = V;
  auto m = std::make_unique<Transformer>(cfg);
  m->init_weights(seed);
  if (bf16) m->enable_bf16();
  if (bf16_master) m->use_bf16_master();
  m->plan(B, T);
  return m;
}

// bf16 master weights made in place (use_bf16_master(false) before init_weights: the seed's values
// rounded one parameter at a time, no fp32 copy of the model, as train and bench make them on the
// host) hold the bits that converting an fp32 init gives, LoRA's adapters included.
TEST(Bf16, MasterWeightsInitializedInPlaceAreTheConvertedInit) {
  ModelConfig cfg = model_preset("llama3-tiny");
  cfg.lora.rank = 4;
  Transformer a(cfg), b(cfg);
  a.init_weights(5);
  a.use_bf16_master();
  b.use_bf16_master(/*convert=*/false);
  b.init_weights(5);
  int checked = 0;
  for (size_t i = 0; i < a.params().params().size(); ++i) {
    const Param &p = a.params().params()[i], &q = b.params().params()[i];
    ASSERT_EQ(q.value.dtype(), DType::kBF16);
    EXPECT_EQ(std::memcmp(p.value.raw(), q.value.raw(), p.value.nbytes()), 0) << p.name;
    checked += p.name.ends_with(".lora_a");
  }
  EXPECT_GT(checked, 0);
}

// gpt2-tiny on a fixed repeating token pattern (learnable), `steps` AdamW steps.
TrainRun train(bool bf16, int steps, bool bf16_master = false) {
  const int64_t B = 4, T = 32;
  auto model = tiny_model(3, bf16, B, T, 97, bf16_master);
  Transformer& m = *model;
  AdamW opt(m.params(), {.seed = 7});
  Tensor tok = Tensor::empty({B, T}, DType::kI32), tgt = Tensor::empty({B, T}, DType::kI32);
  TrainRun r;
  for (int s = 0; s < steps; ++s) {
    for (int64_t i = 0; i < B * T; ++i) {
      int64_t v = (i * 7 + s * 3 + (i / T) * 11) % 97;
      tok.data<int32_t>()[i] = static_cast<int32_t>(v);
      tgt.data<int32_t>()[i] = static_cast<int32_t>((v * 5 + 1) % 97);
    }
    m.params().zero_grad();
    r.losses.push_back(m.forward_backward(tok, tgt));
    if (s == 0)
      for (const Param& p : m.params().params())
        r.grads.insert(r.grads.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    opt.step(3e-3);
  }
  return r;
}

TEST(Bf16, Gpt2TinyTrainsLikeFp32) {
  TrainRun f32 = train(false, 40), b16 = train(true, 40);
  // First step: same loss to bf16 rounding, gradients in the same direction.
  EXPECT_NEAR(b16.losses[0], f32.losses[0], 1e-2 * f32.losses[0]);
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < f32.grads.size(); ++i) {
    dot += double(f32.grads[i]) * b16.grads[i];
    na += double(f32.grads[i]) * f32.grads[i];
    nb += double(b16.grads[i]) * b16.grads[i];
  }
  EXPECT_GT(dot / std::sqrt(na * nb), 0.999);
  EXPECT_NE(std::memcmp(f32.grads.data(), b16.grads.data(), f32.grads.size() * 4), 0)
      << "bf16 should round somewhere: is the bf16 path taken?";
  // Both learn the pattern, and end within 5% of each other: the mean of the last 5 steps (the
  // curve drops steeply there, so a single step compares two trajectories a step out of phase).
  // Measured: 0.8% with AVX512-BF16 matmuls, 3.5% with AMX's (oneDNN's AMX kernels sum in
  // another order, as accurate: the trajectory of 40 steps on a tiny model differs that much).
  // The 2% bar is over 300 steps of the demo (Slow.Bf16DemoEndsWithin2PercentOfFp32:
  // 0.5% on AMX).
  auto tail = [](const TrainRun& r) {
    double sum = 0;
    for (size_t i = r.losses.size() - 5; i < r.losses.size(); ++i) sum += r.losses[i];
    return sum / 5;
  };
  EXPECT_LT(f32.losses.back(), 0.5 * f32.losses[0]);
  EXPECT_NEAR(tail(b16), tail(f32), 0.05 * tail(f32));
}

// bf16 master weights (train.master_weights: bf16) learn as fp32 masters do: the same first loss
// to bf16 rounding of the embeddings, and a final loss within 3% after 60 steps. The weights take
// half the memory of fp32 masters plus their bf16 copies, less (only 2 bytes per parameter).
TEST(Bf16, MasterWeightsTrainLikeFp32Masters) {
  TrainRun f32 = train(true, 60), b16 = train(true, 60, /*bf16_master=*/true);
  EXPECT_NEAR(b16.losses[0], f32.losses[0], 1e-2 * f32.losses[0]);
  EXPECT_NE(b16.losses[1], f32.losses[1]) << "is the bf16 master path taken?";
  EXPECT_LT(b16.losses.back(), 0.5 * b16.losses[0]);
  EXPECT_NEAR(b16.losses.back(), f32.losses.back(), 0.03 * f32.losses.back() + 0.01);
  std::printf("  final loss: fp32 masters %.4f, bf16 masters %.4f (start %.4f)\n",
              f32.losses.back(), b16.losses.back(), f32.losses[0]);

  auto a = tiny_model(3, true, 4, 32), b = tiny_model(3, true, 4, 32, 97, true);
  const ParamSet &pa = a->params(), &pb = b->params();
  EXPECT_EQ(pb.flat_values().dtype(), DType::kBF16);
  EXPECT_EQ(pb.flat_values().numel(), pa.flat_size());
  EXPECT_LE(pb.weight_bytes(), pa.value_bytes() / 2 + 65536);  // + 1-D working copies
  EXPECT_GT(pa.weight_bytes(), pa.value_bytes());              // fp32 values + bf16 copies
  for (size_t i = 0; i < pa.params().size(); ++i) {
    const Param &x = pa.params()[i], &y = pb.params()[i];
    EXPECT_EQ(pa.offset(x), pb.offset(y)) << x.name;  // one flat index space
    if (y.matmul) {
      EXPECT_EQ(y.matmul_weight().raw(), y.value.raw()) << y.name;
    }
    // Each master is fp32's rounded to nearest even, once.
    Tensor want = Tensor::empty(x.shape, DType::kBF16);
    ops::to_bf16(want, x.value);
    EXPECT_EQ(std::memcmp(want.raw(), y.value.raw(), want.nbytes()), 0) << x.name;
  }
}

// Writing new weights (here init_weights; checkpoint and HF loads likewise) marks the bf16 copies
// stale, so the next forward uses the new weights and not copies of the old ones.
TEST(Bf16, CopiesFollowWeightsWrittenOutsideTheOptimizer) {
  Tensor tok = Tensor::zeros({2, 16}, DType::kI32), tgt = Tensor::zeros({2, 16}, DType::kI32);
  for (int64_t i = 0; i < 32; ++i) tgt.data<int32_t>()[i] = static_cast<int32_t>(i % 97);
  auto loss = [&](const std::unique_ptr<Transformer>& m) { return m->forward(tok, tgt); };
  auto a = tiny_model(1, true, 2, 16);
  float before = loss(a);
  a->init_weights(2);
  auto b = tiny_model(2, true, 2, 16);
  EXPECT_NE(loss(a), before);
  EXPECT_EQ(loss(a), loss(b));
}

// After the first steps (primitive creation, scratch growth) a training step allocates no new
// memory: counted as minor page faults, which every fresh buffer costs when first touched. An
// allocation in the step faults in every step; the kernel reclaiming a page now and then (a
// fresh CI run once counted 381 faults over 3 steps, never again) faults in some: so each step
// is counted, and the median of 5 must stay small.
TEST(Bf16, StepsAfterWarmUpTouchNoNewMemory) {
  for (int mode = 0; mode < 3; ++mode) {  // fp32, bf16, bf16 with bf16 master weights
    const bool bf16 = mode > 0;
    const int64_t B = 4, T = 64;
    // GPT-2's vocabulary: several LM-head chunks
    auto model = tiny_model(1, bf16, B, T, 50257, /*bf16_master=*/mode == 2);
    Transformer& m = *model;
    AdamW opt(m.params(), {});
    Tensor tok = Tensor::zeros({B, T}, DType::kI32), tgt = Tensor::zeros({B, T}, DType::kI32);
    for (int64_t i = 0; i < B * T; ++i) tgt.data<int32_t>()[i] = static_cast<int32_t>(i % 50);
    auto step = [&] {
      m.params().zero_grad();
      m.forward_backward(tok, tgt);
      opt.step(1e-3);
    };
    step();
    step();
    std::vector<long> faults;
    for (int i = 0; i < 5; ++i) {
      rusage before{}, after{};
      getrusage(RUSAGE_SELF, &before);
      step();
      getrusage(RUSAGE_SELF, &after);
      faults.push_back(after.ru_minflt - before.ru_minflt);
    }
    std::string all;
    for (long f : faults) all += std::to_string(f) + " ";
    std::sort(faults.begin(), faults.end());
    EXPECT_LT(faults[2], 22) << "mode " << mode << ", minor page faults per step: " << all;
  }
}

}  // namespace
}  // namespace lmforge
