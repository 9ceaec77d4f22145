// Packed rows (data.packing: best_fit): a row holding several documents, with the loader's
// doc_ids passed to the model, gives each document the loss and gradients it has alone in a row
// of its own length (positions from 0, no attention across documents), for learned positions
// (GPT-2) and RoPE with grouped-query attention (Llama). The single-document runs are the
// model as checked against Hugging Face transformers (test_model_reference).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "lmforge/core/rng.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {
namespace {

constexpr int32_t kIgnore = -100;

struct Grads {
  double loss = 0;
  std::vector<float> g;
};

std::vector<float> grads_of(Transformer& m) {
  std::vector<float> out;
  for (Param& p : m.params().params())
    out.insert(out.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
  return out;
}

// Rows of T tokens: documents of the given lengths one after another (-1 in a row's list:
// padding to its end). Targets are the next token of the same document, as the loader writes.
struct Packed {
  int64_t B, T;
  Tensor tokens, targets, doc_ids;
  std::vector<std::vector<int32_t>> docs;  // each document's tokens
};

Packed pack(const std::vector<std::vector<int64_t>>& rows, int64_t T, int64_t V, uint64_t seed) {
  const int64_t B = static_cast<int64_t>(rows.size());
  Packed p{B,
           T,
           Tensor::empty({B, T}, DType::kI32),
           Tensor::empty({B, T}, DType::kI32),
           Tensor::empty({B, T}, DType::kI32),
           {}};
  Rng rng(seed);
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    int32_t d = 0;
    for (int64_t len : rows[b]) {
      if (len < 0) break;  // padding
      std::vector<int32_t> doc;
      for (int64_t i = 0; i < len; ++i, ++t) {
        const int64_t at = b * T + t;
        p.tokens.data<int32_t>()[at] = static_cast<int32_t>(rng.below(V));
        p.doc_ids.data<int32_t>()[at] = d;
        p.targets.data<int32_t>()[at] = kIgnore;
        if (i > 0) p.targets.data<int32_t>()[at - 1] = p.tokens.data<int32_t>()[at];
        doc.push_back(p.tokens.data<int32_t>()[at]);
      }
      p.docs.push_back(doc);
      ++d;
    }
    for (; t < T; ++t) {  // padding
      p.tokens.data<int32_t>()[b * T + t] = 0;
      p.targets.data<int32_t>()[b * T + t] = kIgnore;
      p.doc_ids.data<int32_t>()[b * T + t] = -1;
    }
  }
  return p;
}

Grads run_packed(const ModelConfig& cfg, const Packed& p, Recompute mode) {
  Transformer m(cfg);
  m.init_weights(3);
  m.plan(p.B, p.T, mode);
  m.params().zero_grad();
  Grads r;
  r.loss = m.forward_backward(p.tokens, p.targets, 1.0, kIgnore, p.doc_ids);
  r.g = grads_of(m);
  return r;
}

// Each document alone (a row of its length), its loss weighted by its share of the targets: the
// same objective as the packed batch's mean.
Grads run_alone(const ModelConfig& cfg, const Packed& p) {
  Transformer m(cfg);
  m.init_weights(3);
  m.params().zero_grad();
  int64_t total = 0;
  for (const auto& d : p.docs) total += std::max<int64_t>(static_cast<int64_t>(d.size()) - 1, 0);
  Grads r;
  for (const auto& d : p.docs) {
    const int64_t n = static_cast<int64_t>(d.size());
    if (n < 2) continue;  // a one-token document has no target
    Tensor tok = Tensor::empty({1, n}, DType::kI32), tgt = Tensor::empty({1, n}, DType::kI32);
    for (int64_t i = 0; i < n; ++i) {
      tok.data<int32_t>()[i] = d[i];
      tgt.data<int32_t>()[i] = i + 1 < n ? d[i + 1] : kIgnore;
    }
    m.plan(1, n);
    const double share = static_cast<double>(n - 1) / static_cast<double>(total);
    r.loss += share * m.forward_backward(tok, tgt, share, kIgnore);
  }
  r.g = grads_of(m);
  return r;
}

void check(ModelConfig cfg) {
  cfg.vocab_size = 61;
  cfg.n_layer = 2;
  // Documents of 1 to 130 tokens crossing the CPU kernel's query (64) and key (128) tiles, one
  // row with padding; T = 160.
  cfg.max_seq_len = 160;
  const Packed p = pack({{70, 1, 60, 29}, {130, 30}, {50, 50, -1}}, 160, cfg.vocab_size, 11);
  const Grads packed = run_packed(cfg, p, Recompute::kNone);
  const Grads alone = run_alone(cfg, p);
  EXPECT_NEAR(packed.loss, alone.loss, 1e-5 * std::fabs(alone.loss));
  ASSERT_EQ(packed.g.size(), alone.g.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < alone.g.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(packed.g[i]) - alone.g[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(alone.g[i])));
  }
  EXPECT_LT(worst, 1e-5 * scale) << "largest gradient " << scale;

  // Without doc_ids the documents see each other: a different loss (the test can tell).
  Transformer m(cfg);
  m.init_weights(3);
  m.plan(p.B, p.T);
  const float unpacked = m.forward(p.tokens, p.targets, kIgnore);
  EXPECT_GT(std::fabs(unpacked - packed.loss), 1e-4);

  // Activation checkpointing recomputes the packed forward bit for bit.
  const Grads full = run_packed(cfg, p, Recompute::kFull);
  EXPECT_EQ(full.loss, packed.loss);
  EXPECT_EQ(std::memcmp(full.g.data(), packed.g.data(), packed.g.size() * sizeof(float)), 0);
}

TEST(Packing, Gpt2LearnedPositions) { check(model_preset("gpt2-tiny")); }

TEST(Packing, LlamaRopeGqa) {
  ModelConfig c = model_preset("llama3-tiny");
  ASSERT_LT(c.kv_heads(), c.n_head);  // grouped-query attention
  check(c);
}

}  // namespace
}  // namespace lmforge
