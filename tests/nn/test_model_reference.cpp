// The whole model against PyTorch, as llm.c's test_gpt2: the same parameters, tokens and targets
// through lmforge's Transformer and through tests/reference/model_ref.py (an independent PyTorch
// implementation, run in float64), then logits, loss and EVERY parameter gradient compared.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"
#include "testing/compare.h"

namespace lmforge {
namespace {

using nlohmann::json;

// Normalised error bound (max|a-b| / max|b| per tensor) for the fp32 model against the float64
// reference; observed errors are below 2e-6.
constexpr double kTol = 1e-4;

// The fixture's config must be the preset's: the Python mirrors presets.cpp by hand.
void expect_config_matches(const ModelConfig& c, const json& j) {
  EXPECT_EQ(c.vocab_size, j.at("vocab_size").get<int64_t>());
  EXPECT_EQ(c.max_seq_len, j.at("max_seq_len").get<int64_t>());
  EXPECT_EQ(c.n_layer, j.at("n_layer").get<int64_t>());
  EXPECT_EQ(c.n_head, j.at("n_head").get<int64_t>());
  EXPECT_EQ(c.kv_heads(), j.at("n_kv_head").get<int64_t>());
  EXPECT_EQ(c.n_embd, j.at("n_embd").get<int64_t>());
  EXPECT_EQ(c.ffn(), j.at("ffn_hidden").get<int64_t>());
  EXPECT_EQ(c.norm, j.at("norm").get<std::string>());
  EXPECT_EQ(c.norm_eps, j.at("norm_eps").get<double>());
  EXPECT_EQ(c.mlp, j.at("mlp").get<std::string>());
  EXPECT_EQ(c.pos, j.at("pos").get<std::string>());
  if (c.pos == "rope") {
    EXPECT_EQ(c.rope_theta, j.at("rope_theta").get<double>());
    EXPECT_EQ(c.rope_scaling.factor, 0.0) << "the reference model has no rope scaling";
  }
  EXPECT_EQ(c.bias, j.at("bias").get<bool>());
  EXPECT_EQ(c.tie_embeddings, j.at("tie_embeddings").get<bool>());
}

void check_model(const std::string& preset) {
  Safetensors f = testing::open_fixture("model_" + preset + ".safetensors");
  ModelConfig cfg = model_preset(preset);
  expect_config_matches(cfg, json::parse(f.metadata().at("config")));
  if (::testing::Test::HasFailure()) return;

  Transformer model(cfg);
  std::set<std::string> names;
  for (Param& p : model.params().params()) {
    names.insert(p.name);
    ASSERT_TRUE(f.has(p.name)) << p.name << " is not in the fixture";
    Tensor ref = f.get(p.name);
    ASSERT_TRUE(ref.shape() == p.shape)
        << p.name << ": lmforge " << p.shape.str() << ", reference " << ref.shape().str();
    p.value.copy_from(ref);
  }
  // ...and the reference has no parameter lmforge lacks.
  for (const std::string& n : f.names()) {
    if (n.starts_with("grad.")) {
      EXPECT_TRUE(names.count(n.substr(5))) << n << " has no lmforge param";
    }
  }

  Tensor tokens = f.get("tokens"), targets = f.get("targets");
  model.plan(tokens.size(0), tokens.size(1), Recompute::kNone, /*keep_logits=*/true);
  float loss = model.forward(tokens, targets);

  testing::Diff d;
  EXPECT_TRUE(testing::tensors_close("logits", model.logits(), f.get("logits"), kTol, &d));
  std::printf("  %-36s err %.2e  max abs %.2e\n", "logits", d.err, d.max_abs);
  double ref_loss = f.get("loss").data<float>()[0];
  EXPECT_LE(std::fabs(loss - ref_loss) / std::fabs(ref_loss), kTol)
      << "loss " << loss << " vs " << ref_loss;
  std::printf("  %-36s err %.2e  (%.7f vs %.7f)\n", "loss",
              std::fabs(loss - ref_loss) / std::fabs(ref_loss), loss, ref_loss);

  model.params().zero_grad();
  EXPECT_EQ(model.forward_backward(tokens, targets), loss);
  double worst = 0;
  std::string worst_name;
  for (const Param& p : model.params().params()) {
    EXPECT_TRUE(
        testing::tensors_close("grad." + p.name, p.grad, f.get("grad." + p.name), kTol, &d));
    std::printf("  %-36s err %.2e  max abs %.2e  max|ref| %.2e\n", ("grad." + p.name).c_str(),
                d.err, d.max_abs, d.ref_max);
    if (d.err > worst) worst = d.err, worst_name = p.name;
  }
  std::printf("  worst gradient error %.2e (%s)\n", worst, worst_name.c_str());
}

TEST(ModelReference, Gpt2Tiny) { check_model("gpt2-tiny"); }
TEST(ModelReference, Llama3Tiny) { check_model("llama3-tiny"); }

}  // namespace
}  // namespace lmforge
