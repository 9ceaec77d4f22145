// On the host, ParamSet::zero_grad() leaves the matmul weights' gradients as they are and marks
// them unwritten: the step's first GEMM into each writes it instead of adding to zeros
// (Param::grad_unwritten). Whatever the buffers held before must then not matter: gradients
// filled with NaN before zero_grad() come out identical to those of a model whose gradients were
// zero, for tied (GPT-2) and untied (Llama) heads, fp32 and bf16 matmuls, LoRA adapters, and two
// micro-batches accumulated. Likewise the layers' input gradients (scratch written by their
// layer's backward, not zeroed first): an earlier batch's values in them leave no trace.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {
namespace {

constexpr int64_t kB = 2, kT = 16;

struct Case {
  const char* preset;
  bool bf16;
  int64_t lora_rank;
};

// warm: a batch of other tokens through forward and backward first, so that every activation and
// scratch buffer holds its values (the layers' input gradients are written, not added to).
std::vector<float> gradients(const Case& c, bool poison, int micro_batches, bool warm = false) {
  ModelConfig cfg = model_preset(c.preset);
  cfg.vocab_size = 61;
  cfg.n_layer = 2;
  cfg.lora.rank = c.lora_rank;
  cfg.lora.alpha = 8;
  Transformer m(cfg);
  m.init_weights(4);
  Rng init(11);  // LoRA's B starts at zero: values, so that A's gradient is not zero too
  for (Param& p : m.params().params())
    if (p.name.ends_with(".lora_b"))
      for (int64_t i = 0; i < p.shape.numel(); ++i)
        p.value.data<float>()[i] = static_cast<float>(0.05 * init.normal());
  if (c.bf16) m.enable_bf16();
  m.plan(kB, kT);
  Tensor tok = Tensor::empty({kB, kT}, DType::kI32), tgt = Tensor::empty({kB, kT}, DType::kI32);
  if (warm) {
    Rng other(99);
    for (int64_t i = 0; i < kB * kT; ++i) {
      tok.data<int32_t>()[i] = static_cast<int32_t>(other.below(cfg.vocab_size));
      tgt.data<int32_t>()[i] = static_cast<int32_t>(other.below(cfg.vocab_size));
    }
    m.forward_backward(tok, tgt, 0.5);
  }
  if (poison)
    for (const Param& p : m.params().params())
      if (!p.frozen)
        for (int64_t i = 0; i < p.grad.numel(); ++i)
          p.grad.data<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  m.params().zero_grad();
  bool unwritten = false;
  for (const Param& p : m.params().params()) unwritten |= p.grad_unwritten;
  EXPECT_TRUE(unwritten) << "zero_grad should leave the matmul weights' gradients to their GEMMs";
  Rng rng(7);
  for (int mb = 0; mb < micro_batches; ++mb) {
    for (int64_t i = 0; i < kB * kT; ++i) {
      tok.data<int32_t>()[i] = static_cast<int32_t>(rng.below(cfg.vocab_size));
      tgt.data<int32_t>()[i] = static_cast<int32_t>(rng.below(cfg.vocab_size));
    }
    m.forward_backward(tok, tgt, 0.5);
  }
  std::vector<float> g;
  for (const Param& p : m.params().params()) {
    EXPECT_FALSE(p.grad_unwritten) << p.name << " still unwritten after the backward";
    if (!p.frozen) g.insert(g.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
  }
  return g;
}

class GradWrite : public ::testing::TestWithParam<Case> {};

TEST_P(GradWrite, WhatTheBuffersHeldDoesNotMatter) {
  for (int micro : {1, 2}) {
    const std::vector<float> clean = gradients(GetParam(), false, micro),
                             poisoned = gradients(GetParam(), true, micro);
    ASSERT_EQ(clean.size(), poisoned.size());
    int64_t differ = 0, nonzero = 0;
    for (size_t i = 0; i < clean.size(); ++i) {
      differ += !(clean[i] == poisoned[i]);  // NaN differs; +0 and -0 do not
      nonzero += clean[i] != 0;
    }
    EXPECT_EQ(differ, 0) << micro << " micro-batch(es)";
    EXPECT_GT(nonzero, static_cast<int64_t>(clean.size()) / 2);
  }
}

TEST_P(GradWrite, AnEarlierBatchLeavesNoTrace) {
  const std::vector<float> fresh = gradients(GetParam(), false, 1),
                           warm = gradients(GetParam(), true, 1, true);
  ASSERT_EQ(fresh.size(), warm.size());
  int64_t differ = 0;
  for (size_t i = 0; i < fresh.size(); ++i) differ += !(fresh[i] == warm[i]);
  EXPECT_EQ(differ, 0);
}

INSTANTIATE_TEST_SUITE_P(Models, GradWrite,
                         ::testing::Values(Case{"gpt2-tiny", false, 0}, Case{"gpt2-tiny", true, 0},
                                           Case{"llama3-tiny", false, 0},
                                           Case{"llama3-tiny", true, 0},
                                           Case{"llama3-tiny", true, 4}),
                         [](const auto& info) {
                           std::string n = info.param.preset;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n + (info.param.bf16 ? "_bf16" : "_fp32") +
                                  (info.param.lora_rank ? "_lora" : "");
                         });

}  // namespace
}  // namespace lmforge
