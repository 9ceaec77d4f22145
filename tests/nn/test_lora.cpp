// LoRA adapters (model.lora_rank > 0): the adapted model computes what the merged model
// W' = W + s B A computes, and its adapter gradients are the merged model's weight gradient
// pulled back through the product (dA = s B^T dW', dB = s dW' A^T). The merged model's
// gradients are lmforge's full-model ones (checked against Hugging Face transformers in
// test_model_reference), so these tests check the adapters against an independent route. Only
// the adapters train: the base weights get no gradient, no optimizer state and stay bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>

#include "lmforge/backend/ops.h"
#include "lmforge/core/rng.h"
#include "lmforge/core/stochastic_round.h"
#include "lmforge/models/hf.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

constexpr int64_t kB = 2, kT = 16;

ModelConfig tiny(const std::string& preset, int64_t rank) {
  ModelConfig c = model_preset(preset);
  c.vocab_size = 61;
  c.n_layer = 2;
  c.lora.rank = rank;
  c.lora.alpha = 8;
  return c;
}

void batch(Tensor& tok, Tensor& tgt, uint64_t seed) {
  tok = Tensor::empty({kB, kT}, DType::kI32);
  tgt = Tensor::empty({kB, kT}, DType::kI32);
  Rng rng(seed);
  for (int64_t i = 0; i < kB * kT; ++i) {
    tok.data<int32_t>()[i] = static_cast<int32_t>(rng.below(61));
    tgt.data<int32_t>()[i] = static_cast<int32_t>(rng.below(61));
  }
}

// B starts at 0; values for it, so that the adapters change the model and A gets a gradient.
void randomize_b(Transformer& m, uint64_t seed) {
  Rng rng(seed);
  for (Param& p : m.params().params())
    if (p.name.ends_with(".lora_b"))
      for (int64_t i = 0; i < p.shape.numel(); ++i)
        p.value.data<float>()[i] = static_cast<float>(0.05 * rng.normal());
}

// Both models planned for (kB, kT) and run through one training micro-batch from zeroed
// gradients; their losses.
std::pair<float, float> train_both(Transformer& a, Transformer& b, uint64_t seed) {
  Tensor tok, tgt;
  batch(tok, tgt, seed);
  a.plan(kB, kT);
  b.plan(kB, kT);
  a.params().zero_grad();
  b.params().zero_grad();
  const float la = a.forward_backward(tok, tgt);
  return {la, b.forward_backward(tok, tgt)};
}

const Param& param(const Transformer& m, const std::string& name) {
  for (const Param& p : m.params().params())
    if (p.name == name) return p;
  ADD_FAILURE() << "no parameter " << name;
  return m.params().params().front();
}

// The Hugging Face modules a layer ("blocks.0.attn.qkv") holds: their output widths, each with
// its own A (rows [p r, (p + 1) r) of lora_a) and B (its columns of lora_b).
std::vector<int64_t> modules_of(const ModelConfig& c, const std::string& layer) {
  for (auto [suffix, kind] : {std::pair{".attn.qkv", "qkv"},
                              {".attn.proj", "proj"},
                              {".mlp.fc", "fc"},
                              {".mlp.proj", "down"}})
    if (layer.ends_with(suffix)) return c.lora_pieces(kind);
  ADD_FAILURE() << "no layer " << layer;
  return {};
}

void check_against_merged(const std::string& preset) {
  const ModelConfig lc = tiny(preset, 4), bc = tiny(preset, 0);
  Transformer lora(lc), merged(bc);
  lora.init_weights(3);
  merged.init_weights(3);
  randomize_b(lora, 9);
  const double s = lc.lora.scale();
  std::vector<std::string> layers;
  size_t modules = 0;
  for (Param& p : merged.params().params()) {
    const Param& lp = param(lora, p.name);  // the base weights are the non-LoRA model's
    ASSERT_EQ(std::memcmp(lp.value.raw(), p.value.raw(), p.value.nbytes()), 0) << p.name;
    if (!p.name.ends_with(".weight")) continue;
    const std::string layer = p.name.substr(0, p.name.size() - 7);
    bool adapted = false;
    for (const Param& q : lora.params().params()) adapted |= q.name == layer + ".lora_a";
    if (!adapted) continue;
    layers.push_back(layer);
    const Param& a = param(lora, layer + ".lora_a");
    const Param& b = param(lora, layer + ".lora_b");
    const std::vector<int64_t> mods = modules_of(lc, layer);
    modules += mods.size();
    const int64_t r = b.shape[0], C = a.shape[1], OC = b.shape[1];
    ASSERT_EQ(a.shape[0], static_cast<int64_t>(mods.size()) * r) << layer;
    const float* A = a.value.data<float>();
    const float* Bt = b.value.data<float>();
    // W' rows of module m: W + s B_m A_m.
    for (int64_t m = 0, o0 = 0; m < static_cast<int64_t>(mods.size()); o0 += mods[m++])
      for (int64_t o = o0; o < o0 + mods[m]; ++o)
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t k = 0; k < r; ++k)
            acc += static_cast<double>(Bt[k * OC + o]) * A[(m * r + k) * C + c];
          p.value.data<float>()[o * C + c] += static_cast<float>(s * acc);
        }
  }
  ASSERT_EQ(layers.size(), 4u * lc.n_layer) << "qkv, proj, fc and down of every block";
  // Llama's q, k, v and gate, up are modules of their own (each its A), GPT-2's c_attn and c_fc
  // one each.
  EXPECT_EQ(modules, (preset.starts_with("llama") ? 7u : 4u) * lc.n_layer);

  const auto [ll, lm] = train_both(lora, merged, 21);
  EXPECT_NEAR(ll, lm, 2e-6 * std::fabs(lm));

  for (const std::string& layer : layers) {
    const Param& a = param(lora, layer + ".lora_a");
    const Param& b = param(lora, layer + ".lora_b");
    const Param& w = param(merged, layer + ".weight");
    const std::vector<int64_t> mods = modules_of(lc, layer);
    const int64_t r = b.shape[0], C = a.shape[1], OC = b.shape[1];
    const float* A = a.value.data<float>();
    const float* Bt = b.value.data<float>();
    const float* dW = w.grad.data<float>();
    // Module m, rows o of W': dA_m (r, C) = s B_m^T dW'_m, d(lora_b)[k, o] = s (A_m dW'_m^T)[k, o].
    std::vector<double> da(a.shape.numel(), 0.0), db(b.shape.numel(), 0.0);
    for (int64_t m = 0, o0 = 0; m < static_cast<int64_t>(mods.size()); o0 += mods[m++])
      for (int64_t o = o0; o < o0 + mods[m]; ++o)
        for (int64_t k = 0; k < r; ++k)
          for (int64_t c = 0; c < C; ++c) {
            da[(m * r + k) * C + c] += s * Bt[k * OC + o] * dW[o * C + c];
            db[k * OC + o] += s * A[(m * r + k) * C + c] * dW[o * C + c];
          }
    for (auto [got, want, what] : {std::tuple{&a, &da, "lora_a"}, {&b, &db, "lora_b"}}) {
      double worst = 0, scale = 0;
      for (size_t i = 0; i < want->size(); ++i) {
        worst = std::max(worst, std::fabs(got->grad.data<float>()[i] - (*want)[i]));
        scale = std::max(scale, std::fabs((*want)[i]));
      }
      EXPECT_GT(scale, 0) << layer << " " << what;
      EXPECT_LT(worst, 1e-4 * scale) << layer << " " << what;
    }
  }
  // Frozen: no gradient at all, not even a buffer (the model's gradients are the adapters' alone).
  int64_t trained = 0;
  for (const Param& p : lora.params().params()) {
    if (p.frozen) {
      EXPECT_FALSE(p.grad.defined()) << p.name;
    } else {
      trained += p.shape.numel();
    }
  }
  EXPECT_LT(lora.params().flat_grads().numel(), trained + 16 * 2 * 4 * lc.n_layer);
}

TEST(Lora, GptAdaptersMatchTheMergedModel) { check_against_merged("gpt2-tiny"); }
TEST(Lora, LlamaAdaptersMatchTheMergedModel) { check_against_merged("llama3-tiny"); }

// AdamW keeps state for the adapters only and never moves a frozen weight; after training, the
// Hugging Face export (adapters merged) computes the adapted model's logits.
// Generation folds the adapters into the weights (merge_lora_adapters): the decoded logits of a
// prompt and the tokens after it are those of the model with its adapters, and the adapters are
// off afterwards (their cost gone). Llama's fused qkv and fc: an A per module.
TEST(Lora, MergedForGenerationDecodesAsTheAdapters) {
  for (const char* preset : {"gpt2-tiny", "llama3-tiny"}) {
    Transformer m(tiny(preset, 4));
    m.init_weights(3);
    randomize_b(m, 9);
    const std::vector<int32_t> ids = {5, 17, 2, 40, 33, 8, 11, 60, 1};
    auto logits = [&] {
      KvCache cache = m.make_cache(static_cast<int64_t>(ids.size()));
      std::vector<float> all;
      Tensor l = m.decode(cache, ids.data(), 4, 0);
      all.assign(l.data<float>(), l.data<float>() + l.numel());
      for (int64_t t = 4; t < static_cast<int64_t>(ids.size()); ++t) {
        l = m.decode(cache, ids.data() + t, 1, t);
        all.insert(all.end(), l.data<float>(), l.data<float>() + l.numel());
      }
      return all;
    };
    const std::vector<float> with = logits();
    const Tensor qkv_before = param(m, "blocks.1.attn.qkv.weight").value.clone();
    merge_lora_adapters(m);
    const std::vector<float> merged = logits();
    double err = 0, mag = 0;
    for (size_t i = 0; i < with.size(); ++i) {
      err = std::max(err, static_cast<double>(std::fabs(with[i] - merged[i])));
      mag = std::max(mag, static_cast<double>(std::fabs(with[i])));
    }
    EXPECT_LT(err, 1e-5 * mag) << preset;
    EXPECT_GT(mag, 0) << preset;
    const Tensor& qkv = param(m, "blocks.1.attn.qkv.weight").value;
    EXPECT_NE(std::memcmp(qkv.raw(), qkv_before.raw(), qkv.nbytes()), 0) << "weights unchanged";
    EXPECT_TRUE(m.adapters_off()) << preset;
  }
}

TEST(Lora, OnlyAdaptersTrainAndTheExportIsMerged) {
  const ModelConfig lc = tiny("llama3-tiny", 8);
  Transformer m(lc);
  m.init_weights(5);
  const Tensor before = m.params().flat_values().clone();
  AdamW opt(m.params(), {.weight_decay = 0.1});
  EXPECT_EQ(static_cast<int64_t>(opt.slots().size()), 2 * 4 * lc.n_layer);
  EXPECT_LT(opt.state_bytes(), 8 * static_cast<size_t>(lc.lora_params()) + 4096);
  Tensor tok, tgt;
  batch(tok, tgt, 4);
  m.plan(kB, kT);
  float first = 0, last = 0;
  for (int step = 0; step < 8; ++step) {
    m.params().zero_grad();
    last = m.forward_backward(tok, tgt);
    if (step == 0) first = last;
    opt.step(1e-2);
  }
  EXPECT_LT(last, first - 0.05) << "the adapters learn the batch";
  for (const Param& p : m.params().params()) {
    const Tensor was = before.view({before.numel()}).slice(m.params().offset(p), p.shape.numel());
    const bool same = std::memcmp(was.raw(), p.value.raw(), p.value.nbytes()) == 0;
    EXPECT_EQ(same, p.frozen) << p.name;
  }

  const std::string dir = testing::temp_dir("lora-export");
  save_hf_model(m, nullptr, dir, DType::kF32, 1ull << 30);
  ModelConfig base = lc;
  base.lora.rank = 0;
  Transformer hf(base);
  load_hf_weights(hf, dir);
  m.plan(kB, kT, Recompute::kNone, /*keep_logits=*/true);
  hf.plan(kB, kT, Recompute::kNone, /*keep_logits=*/true);
  m.forward(tok, Tensor());
  hf.forward(tok, Tensor());
  const float* a = m.logits().data<float>();
  const float* b = hf.logits().data<float>();
  double worst = 0;
  for (int64_t i = 0; i < m.logits().numel(); ++i)
    worst = std::max<double>(worst, std::fabs(a[i] - b[i]));
  EXPECT_LT(worst, 1e-4);
}

void check_bf16(const std::string& preset) {
  const ModelConfig lc = tiny(preset, 4);
  Transformer f32(lc), b16(lc);
  for (Transformer* m : {&f32, &b16}) {
    m->init_weights(2);
    randomize_b(*m, 6);
  }
  b16.enable_bf16();
  const auto [lf, lb] = train_both(f32, b16, 8);
  EXPECT_NEAR(lb, lf, 2e-2 * std::fabs(lf));
  for (size_t i = 0; i < f32.params().params().size(); ++i) {
    const Param& a = f32.params().params()[i];
    const Param& b = b16.params().params()[i];
    if (!is_lora_param(a.name)) continue;
    double dd = 0, aa = 0;
    for (int64_t k = 0; k < a.grad.numel(); ++k) {
      const double x = a.grad.data<float>()[k], y = b.grad.data<float>()[k];
      dd += (x - y) * (x - y);
      aa += x * x;
    }
    EXPECT_GT(aa, 0) << a.name;
    EXPECT_LT(std::sqrt(dd / aa), 5e-2) << a.name;
  }
}

// Under bf16 the adapters' products are added into fp32 matmul outputs: the loss and the
// adapters' gradients stay close to fp32's (Llama's layers of several modules too: their B
// expanded in bf16).
TEST(Lora, Bf16IsCloseToFp32) {
  for (const char* preset : {"gpt2-tiny", "llama3-tiny"}) {
    SCOPED_TRACE(preset);
    check_bf16(preset);
  }
}

// model.lora_targets by Hugging Face module (PEFT's target_modules rule): Llama's q_proj and
// v_proj adapt those two modules of the fused qkv, whose k part then holds A = B = 0 and keeps
// them through training with weight decay (no gradient reaches it), while q's and v's train. The
// trainable count is PEFT's; an unknown name is one error naming the family's modules.
TEST(Lora, TargetsByModuleAdaptThoseModulesAlone) {
  ModelConfig lc = tiny("llama3-tiny", 4);
  lc.lora.targets = "q_proj,v_proj,mlp.down_proj";
  lc.validate();
  EXPECT_TRUE(lc.lora_adapts("qkv") && lc.lora_adapts("down"));
  EXPECT_FALSE(lc.lora_adapts("proj") || lc.lora_adapts("fc"));
  EXPECT_EQ(lc.lora_modules("qkv"), (std::vector<bool>{true, false, true}));
  const int64_t C = lc.n_embd, r = 4, q = lc.n_head * lc.head_size(),
                kv = lc.kv_heads() * lc.head_size();
  EXPECT_EQ(lc.lora_params(/*adapted=*/true),
            lc.n_layer * r * ((C + q) + (C + kv) + (lc.ffn() + C)));
  EXPECT_EQ(lc.lora_params(), lc.lora_params(true) + lc.n_layer * r * (C + kv));

  Transformer m(lc);
  m.init_weights(5);
  randomize_b(m, 7);  // (k's columns too: put back to 0 below, as an import leaves them)
  const Param& a = param(m, "blocks.0.attn.qkv.lora_a");
  const Param& bt = param(m, "blocks.0.attn.qkv.lora_b");
  auto k_part = [&](bool zero_it) {
    double sum = 0;
    for (int64_t i = r * C; i < 2 * r * C; ++i) sum += std::fabs(a.value.data<float>()[i]);
    for (int64_t k = 0; k < r; ++k)
      for (int64_t o = q; o < q + kv; ++o) {
        float& v = bt.value.data<float>()[k * bt.shape[1] + o];
        sum += std::fabs(v);
        if (zero_it) v = 0;
      }
    return sum;
  };
  EXPECT_GT(k_part(/*zero_it=*/true), 0) << "randomize_b wrote k's B";
  EXPECT_EQ(k_part(false), 0.0) << "k's A starts at 0";
  const Tensor before = m.params().flat_values().clone();
  AdamW opt(m.params(), {.weight_decay = 0.1});
  Tensor tok, tgt;
  batch(tok, tgt, 4);
  m.plan(kB, kT);
  for (int step = 0; step < 4; ++step) {
    m.params().zero_grad();
    m.forward_backward(tok, tgt);
    opt.step(1e-2);
  }
  EXPECT_EQ(k_part(false), 0.0) << "k's adapter stays absent";
  const Tensor was = before.view({before.numel()}).slice(m.params().offset(a), a.shape.numel());
  EXPECT_NE(std::memcmp(was.raw(), a.value.raw(), a.value.nbytes()), 0) << "q's and v's train";

  for (auto [preset, targets, want] :
       {std::tuple{"llama3-tiny", "q_prog", "\"q_prog\" is not a layer or module of this llama"},
        {"gpt2-tiny", "q_proj", "its modules c_attn, c_proj, c_fc (comma-separated)"}}) {
    ModelConfig bad = tiny(preset, 4);
    bad.lora.targets = targets;
    try {
      bad.validate();
      ADD_FAILURE() << targets;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  }
  ModelConfig gpt = tiny("gpt2-tiny", 4);  // PEFT's "c_proj" is both of GPT-2's
  gpt.lora.targets = "c_proj";
  EXPECT_TRUE(gpt.lora_adapts("proj") && gpt.lora_adapts("down") && !gpt.lora_adapts("qkv"));
}

// lora_pieces and lora_module_names split a layer as the Hugging Face import and export do
// (hf_pieces), for each family's fused layers.
TEST(Lora, ModulesAreTheHuggingFaceModules) {
  for (const char* arch : {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"}) {
    SCOPED_TRACE(arch);
    ModelConfig c = tiny(std::string(arch) == "gpt2" ? "gpt2-tiny" : "llama3-tiny", 4);
    c.arch = arch;
    c.n_kv_head = std::string(arch) == "gpt2" ? 0 : 2;
    for (auto [layer, param, rows] :
         {std::tuple{"qkv", "blocks.0.attn.qkv.weight", c.qkv_dim()},
          {"proj", "blocks.0.attn.proj.weight", c.n_embd},
          {"fc", "blocks.0.mlp.fc.weight", c.mlp == "swiglu" ? 2 * c.ffn() : c.ffn()},
          {"down", "blocks.0.mlp.proj.weight", c.n_embd}}) {
      const std::vector<HfPiece> hf = hf_pieces(c, param, rows);
      const std::vector<int64_t> widths = c.lora_pieces(layer);
      const std::vector<std::string> names = c.lora_module_names(layer);
      ASSERT_EQ(hf.size(), widths.size()) << layer;
      ASSERT_EQ(hf.size(), names.size()) << layer;
      for (size_t i = 0; i < hf.size(); ++i) {
        EXPECT_EQ(hf[i].rows, widths[i]) << layer;
        EXPECT_TRUE(hf[i].name.ends_with("." + names[i] + ".weight")) << hf[i].name;
      }
    }
  }
}

// LoRA's dropout (PEFT's lora_dropout): in a training forward the adapters see the input with
// element i zeroed where sr_bits(key, i) < p 2^32 (the documented mask) and the rest scaled by
// 1 / (1 - p), while the base layer sees it whole. Outputs and every gradient against that
// definition in double, for a layer of three modules (Llama's qkv); without the scratch (an
// evaluation) the adapters see the whole input; the mask drops about p of the elements.
TEST(Lora, DropoutFollowsItsDefinition) {
  const int64_t N = 6, C = 8, r = 2, OC = 8;
  const std::vector<int64_t> pieces{4, 2, 2};
  const double p = 0.3, s = 1.5;
  ParamSet ps;
  Linear l;
  l.declare(ps, "blocks.0.attn.qkv", C, OC, false, r, s, pieces, p);
  ps.finalize();
  Rng rng(11);
  for (Param& q : ps.params())
    for (int64_t i = 0; i < q.shape.numel(); ++i)
      q.value.data<float>()[i] = static_cast<float>(0.5 * rng.normal());
  Tensor x = Tensor::empty({N, C}, DType::kF32), dout = Tensor::empty({N, OC}, DType::kF32);
  for (int64_t i = 0; i < N * C; ++i) x.data<float>()[i] = static_cast<float>(rng.normal());
  for (int64_t i = 0; i < N * OC; ++i) dout.data<float>()[i] = static_cast<float>(rng.normal());
  const uint32_t key = 0x1234567u;
  const Tensor xs = Tensor::zeros({N, C}, DType::kF32), gs = Tensor::zeros({N, C}, DType::kF32);
  const Tensor t = Tensor::zeros({N, 3 * r}, DType::kF32),
               dt = Tensor::zeros({N, 3 * r}, DType::kF32);
  const Tensor bfull = Tensor::zeros({3 * r * OC}, DType::kF32);
  const Tensor dbfull = Tensor::zeros({3 * r * OC}, DType::kF32);
  const LoraDropout drop{key, xs, gs};

  // The definition: m_i / (1 - p) on the adapters' input.
  std::vector<double> xd(N * C);
  int64_t dropped = 0;
  for (int64_t i = 0; i < N * C; ++i) {
    const bool keep =
        sr_bits(key, static_cast<uint32_t>(i)) >= static_cast<uint32_t>(p * 4294967296.0);
    dropped += !keep;
    xd[i] = keep ? x.data<float>()[i] / (1 - p) : 0.0;
  }
  ASSERT_GT(dropped, 0);
  ASSERT_LT(dropped, N * C);
  const float* W = l.weight->value.data<float>();
  const float* A = l.lora_a->value.data<float>();
  const float* Bt = l.lora_b->value.data<float>();
  auto module_of = [&](int64_t o) { return o < 4 ? 0 : o < 6 ? 1 : 2; };
  // u[n][m r + k] = s (A_m xd_n)_k; out = W x + B_m u_m.
  std::vector<double> u(N * 3 * r, 0.0), want(N * OC, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < 3 * r; ++j) {
      for (int64_t c = 0; c < C; ++c) u[n * 3 * r + j] += A[j * C + c] * xd[n * C + c];
      u[n * 3 * r + j] *= s;
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double v = 0;
      for (int64_t c = 0; c < C; ++c) v += W[o * C + c] * x.data<float>()[n * C + c];
      for (int64_t k = 0; k < r; ++k) v += Bt[k * OC + o] * u[n * 3 * r + module_of(o) * r + k];
      want[n * OC + o] = v;
    }
  const Tensor out = Tensor::empty({N, OC}, DType::kF32);
  l.forward(out, x, t, bfull, drop);
  for (int64_t i = 0; i < N * OC; ++i) EXPECT_NEAR(out.data<float>()[i], want[i], 1e-4) << i;

  // Gradients: dB^T[k][o] = sum_n u dout; dv = s B_m^T dout (per module); dA = dv^T xd;
  // dx = W^T dout + (A^T dv) * m / (1 - p).
  std::vector<double> dbt(r * OC, 0.0), dv(N * 3 * r, 0.0), da(3 * r * C, 0.0), dx(N * C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      const double g = dout.data<float>()[n * OC + o];
      for (int64_t k = 0; k < r; ++k) {
        dbt[k * OC + o] += u[n * 3 * r + module_of(o) * r + k] * g;
        dv[n * 3 * r + module_of(o) * r + k] += s * Bt[k * OC + o] * g;
      }
      for (int64_t c = 0; c < C; ++c) dx[n * C + c] += W[o * C + c] * g;
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < 3 * r; ++j)
      for (int64_t c = 0; c < C; ++c) {
        da[j * C + c] += dv[n * 3 * r + j] * xd[n * C + c];
        if (xd[n * C + c] != 0.0) dx[n * C + c] += A[j * C + c] * dv[n * 3 * r + j] / (1 - p);
      }
  l.weight->frozen = true;
  ps.zero_grad();
  const Tensor dinp = Tensor::zeros({N, C}, DType::kF32);
  xs.zero_();  // backward draws the mask again
  l.backward(dinp, dout, x, t, dt, true, bfull, dbfull, drop);
  for (int64_t i = 0; i < N * C; ++i) EXPECT_NEAR(dinp.data<float>()[i], dx[i], 1e-4) << i;
  for (int64_t i = 0; i < 3 * r * C; ++i)
    EXPECT_NEAR(l.lora_a->grad.data<float>()[i], da[i], 1e-4) << i;
  for (int64_t i = 0; i < r * OC; ++i)
    EXPECT_NEAR(l.lora_b->grad.data<float>()[i], dbt[i], 1e-4) << i;

  // An evaluation (no scratch): the adapters see x itself.
  const Tensor plain = Tensor::empty({N, OC}, DType::kF32);
  l.forward(plain, x, {}, {});
  double moved = 0;
  for (int64_t i = 0; i < N * OC; ++i)
    moved += std::fabs(plain.data<float>()[i] - out.data<float>()[i]);
  EXPECT_GT(moved, 1e-3);

  // A million elements (many of the kernel's chunks): each dropped exactly where the definition
  // says, about p of them, the rest scaled by 1 / (1 - p); the backward keeps the same ones.
  const int64_t M = (1 << 20) + 7;
  const uint32_t cut = static_cast<uint32_t>(p * 4294967296.0);
  const Tensor ones = Tensor::empty({M}, DType::kF32), d = Tensor::empty({M}, DType::kF32);
  ones.fill_(1.0);
  ops::dropout_forward(d, ones, p, 99);
  const Tensor back = Tensor::zeros({M}, DType::kF32);
  ops::dropout_backward(back, ones, p, 99);
  int64_t zeros = 0;
  for (int64_t i = 0; i < M; ++i) {
    const float v = d.data<float>()[i];
    ASSERT_EQ(v == 0.0f, sr_bits(99, static_cast<uint32_t>(i)) < cut) << i;
    ASSERT_EQ(back.data<float>()[i], v) << i;
    zeros += v == 0.0f;
    if (v != 0.0f) {
      ASSERT_EQ(v, static_cast<float>(1.0 / (1.0 - p))) << i;
    }
  }
  EXPECT_NEAR(static_cast<double>(zeros) / M, p, 0.003);
  // A bf16 input (bf16 matmul inputs) is widened exactly first: the same as its fp32 values.
  const Tensor r32 = Tensor::empty({1000}, DType::kF32), r16 = Tensor::empty({1000}, DType::kBF16);
  for (int64_t i = 0; i < 1000; ++i) r32.data<float>()[i] = static_cast<float>(rng.normal());
  ops::to_bf16(r16, r32);
  ops::from_bf16(r32, r16);
  const Tensor o32 = Tensor::empty({1000}, DType::kF32), o16 = Tensor::empty({1000}, DType::kF32);
  ops::dropout_forward(o32, r32, p, 5);
  ops::dropout_forward(o16, r16, p, 5);
  EXPECT_EQ(std::memcmp(o32.raw(), o16.raw(), o32.nbytes()), 0);
}

// In a model: evaluation applies no dropout (the same logits as the model without it), training
// forwards do, each micro-batch its own mask from (key, call), identical after the same key again;
// recomputing activations (selective, full) draws the same masks: bit-identical gradients.
TEST(Lora, DropoutInTrainingOnlyAndRecomputedAlike) {
  ModelConfig dc = tiny("llama3-tiny", 4), pc = dc;
  dc.lora.dropout = 0.2;
  Tensor tok, tgt;
  batch(tok, tgt, 3);
  auto make = [&](const ModelConfig& c, Recompute mode) {
    auto m = std::make_unique<Transformer>(c);
    m->init_weights(4);
    randomize_b(*m, 5);
    m->plan(kB, kT, mode);
    return m;
  };
  auto grads = [](const Transformer& m) { return m.params().flat_grads().clone(); };
  auto same = [](const Tensor& a, const Tensor& b) {
    return std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
  };
  auto plain = make(pc, Recompute::kNone), dropped = make(dc, Recompute::kNone);
  EXPECT_EQ(plain->forward(tok, tgt), dropped->forward(tok, tgt)) << "evaluation: no dropout";
  plain->params().zero_grad();
  const float lp = plain->forward_backward(tok, tgt);
  std::vector<Tensor> g;
  std::vector<float> loss;
  for (int call = 0; call < 2; ++call) {
    dropped->set_lora_dropout_key(7);
    for (int k = 0; k < 2; ++k) {
      dropped->params().zero_grad();
      loss.push_back(dropped->forward_backward(tok, tgt));
      g.push_back(grads(*dropped));
    }
  }
  EXPECT_NE(loss[0], lp);
  EXPECT_NE(loss[0], loss[1]) << "a new mask each training forward";
  EXPECT_EQ(loss[0], loss[2]);
  EXPECT_TRUE(same(g[0], g[2])) << "the same key, the same masks";
  EXPECT_FALSE(same(g[0], g[1]));
  for (Recompute mode : {Recompute::kSelective, Recompute::kFull}) {
    auto m = make(dc, mode);
    m->set_lora_dropout_key(7);
    m->params().zero_grad();
    EXPECT_EQ(m->forward_backward(tok, tgt), loss[0]);
    EXPECT_TRUE(same(grads(*m), g[0])) << static_cast<int>(mode);
  }
}

}  // namespace
}  // namespace lmforge
