// The KV-cache decode path must agree with the training forward: feeding a sequence in chunks
// through decode() gives, for the last token, the logits forward() gives at that position.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/error.h"
#include "lmforge/core/rng.h"
#include "lmforge/eval/generate.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {

namespace {
// The last position's logits of a prompt chunk at position 0 (the tiled attention), a chunk of 3
// after it (the cache's attention, several rows) and single tokens, against the full forward.
// bf16: the weights held in bf16 (generate --precision bf16) against the training forward with
// bf16 weights and fp32 activations: the same matmuls of bf16-rounded inputs, in another order,
// and the cache's keys and values rounded to bf16.
// A 2-layer model of cfg's family, 97 ids, the weights of seed 3; bf16: held in bf16 (generate
// --precision bf16), its training forward with fp32 activations.
std::unique_ptr<Transformer> small_model(ModelConfig cfg, bool bf16) {
  cfg.vocab_size = 97;
  cfg.n_layer = 2;
  auto model = std::make_unique<Transformer>(cfg);
  model->init_weights(3);
  if (bf16) {
    model->enable_bf16();
    model->use_bf16_master();
    model->set_bf16_activations(false);
    model->set_bf16_matmul_outputs(false);
  }
  return model;
}

void check_decode_matches_forward(const ModelConfig& cfg, bool bf16 = false) {
  const std::unique_ptr<Transformer> owner = small_model(cfg, bf16);
  Transformer& model = *owner;
  const int64_t T = 40;  // (the cache's attention over more than a vector of keys)
  model.plan(1, T, Recompute::kNone, /*keep_logits=*/true);
  Tensor tok = Tensor::empty({1, T}, DType::kI32);
  Rng rng(5);
  for (int64_t t = 0; t < T; ++t) tok.data<int32_t>()[t] = static_cast<int32_t>(rng.below(97));
  model.forward(tok, Tensor());
  const float* ref = model.logits().data<float>() + (T - 1) * 97;

  KvCache cache = model.make_cache(T);
  const int32_t* ids = tok.data<int32_t>();
  model.decode(cache, ids, 5, 0);
  Tensor last = model.decode(cache, ids + 5, 3, 5);
  for (int64_t t = 8; t < T; ++t) last = model.decode(cache, ids + t, 1, t);
  double max_err = 0, max_ref = 0;
  for (int v = 0; v < 97; ++v) {
    max_err = std::max(max_err, static_cast<double>(std::fabs(last.data<float>()[v] - ref[v])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(ref[v])));
  }
  // (bf16: the cache's rounding, 2^-9 relative, moves the logits by ~3e-3 of their range; a
  // wrong position or layer moves them by O(1). The bf16 cache's attention is checked exactly
  // below.)
  EXPECT_LT(max_err / max_ref, bf16 ? 1e-2 : 1e-5)
      << cfg.preset << (bf16 ? " bf16" : "") << " max abs err " << max_err;
}
}  // namespace

TEST(Decode, KvCacheMatchesFullForwardGpt2) {
  check_decode_matches_forward(model_preset("gpt2-tiny"));
}
TEST(Decode, KvCacheMatchesFullForwardLlama) {
  check_decode_matches_forward(model_preset("llama3-tiny"));
}
TEST(Decode, Bf16WeightsMatchTheBf16Forward) {
  check_decode_matches_forward(model_preset("gpt2-tiny"), /*bf16=*/true);
  check_decode_matches_forward(model_preset("llama3-tiny"), /*bf16=*/true);
}

// The cache's attention over bf16 keys and values equals the fp32 one over the same values
// widened: several query rows after earlier positions, a window, grouped heads, a head size with
// a partial vector.
TEST(Decode, Bf16CacheAttentionIsTheFp32OneOnTheRoundedValues) {
  const int64_t NH = 4, NKV = 2, HS = 40, T_max = 70, n = 3, pos0 = 60, Cq = (NH + 2 * NKV) * HS;
  Rng rng(9);
  std::vector<float> q(n * Cq), k(NKV * T_max * HS), v(k.size());
  for (float& x : q) x = static_cast<float>(rng.normal());
  std::vector<uint16_t> k16(k.size()), v16(v.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k16[i] = fp32_to_bf16(static_cast<float>(rng.normal()));
    v16[i] = fp32_to_bf16(static_cast<float>(rng.normal()));
    k[i] = bf16_to_fp32(k16[i]);
    v[i] = bf16_to_fp32(v16[i]);
  }
  for (int64_t window : {0, 25}) {
    std::vector<float> a(n * NH * HS), b(a.size());
    cpu::attention_decode(a.data(), q.data(), Cq, k.data(), v.data(), n, pos0, T_max, NH, NKV, HS,
                          window);
    cpu::attention_decode(b.data(), q.data(), Cq, k16.data(), v16.data(), n, pos0, T_max, NH, NKV,
                          HS, window);
    for (size_t i = 0; i < a.size(); ++i)
      ASSERT_EQ(a[i], b[i]) << "window " << window << " at " << i;
  }
}

// Qwen3-style q/k norms with head_dim != n_embd / n_head, and a Mistral-style window shorter
// than the sequence (the cache keeps every position; attention must skip the old ones).
TEST(Decode, KvCacheMatchesFullForwardQkNormAndHeadDim) {
  ModelConfig c = model_preset("llama3-tiny");
  c.qk_norm = true;
  c.head_dim = 2 * c.n_embd / c.n_head;
  c.qkv_bias = true;
  check_decode_matches_forward(c);
  EXPECT_EQ(Transformer(c).params().numel(), c.num_params());
}
// A head size past the attention's 8 output vectors per pass, with a partial last one.
TEST(Decode, KvCacheMatchesFullForwardWideHeads) {
  ModelConfig c = model_preset("llama3-tiny");
  c.head_dim = 136;
  check_decode_matches_forward(c);
  check_decode_matches_forward(c, /*bf16=*/true);
}
TEST(Decode, KvCacheMatchesFullForwardSlidingWindow) {
  ModelConfig c = model_preset("llama3-tiny");
  c.sliding_window = 4;
  check_decode_matches_forward(c);
}

TEST(Presets, SizesMatchThePublicConfigurations) {
  // Parameter counts of the HF checkpoints (tied embeddings counted once).
  EXPECT_EQ(model_preset("gpt2").num_params(), 124439808);
  EXPECT_EQ(model_preset("gpt2-medium").num_params(), 354823168);
  EXPECT_EQ(model_preset("gpt2-large").num_params(), 774030080);
  EXPECT_EQ(model_preset("gpt2-xl").num_params(), 1557611200);
  EXPECT_EQ(model_preset("llama3.2-1b").num_params(), 1235814400);
  EXPECT_EQ(model_preset("llama3.2-3b").num_params(), 3212749824);
  EXPECT_EQ(model_preset("llama3-8b").num_params(), 8030261248);
  EXPECT_EQ(model_preset("gemma3-270m").num_params(), 268098176);  // transformers' count
  // BENCHMARKS.md's FLOPs per token: 6 * (124,439,808 - 1024*768 learned positions; the tied
  // head counts once as the LM head) + 12 * 12 * 768 * 1024.
  EXPECT_EQ(model_preset("gpt2").flops_per_token(1024), 6.0 * 123653376 + 12.0 * 12 * 768 * 1024);
  Transformer tiny(model_preset("gpt2-tiny"));
  EXPECT_EQ(tiny.params().numel(), model_preset("gpt2-tiny").num_params());
}

// A tiny temperature or an infinite logit overflows logit / temperature: sampling must then take
// the top token (the limit of softmax(logits / T) as T -> 0), never the least likely one.
TEST(Sampling, OverflowingTemperatureOrInfiniteLogitIsGreedy) {
  const float logits[5] = {1.0f, 5.0f, -3.0f, 4.0f, 0.5f};
  SamplingOptions o;
  Rng rng(7);
  o.temperature = 1e-310;  // finite and positive: check_sampling takes it
  check_sampling(o, false);
  for (int top_k : {0, 3}) {
    o.top_k = top_k;
    for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(logits, 5, o, rng), 1) << top_k;
  }
  const float inf = std::numeric_limits<float>::infinity();
  const float with_inf[4] = {0.0f, -1.0f, inf, 2.0f};
  o.temperature = 0.8;
  o.top_k = 0;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(with_inf, 4, o, rng), 2);
  const float with_nan[3] = {0.0f, std::nanf(""), 1.0f};
  EXPECT_THROW(sample_token(with_nan, 3, o, rng), Error);
}

// Sampling follows softmax(logits / T): frequencies over many draws match the probabilities.
TEST(Sampling, FrequenciesFollowTheTemperedSoftmax) {
  const float logits[4] = {0.2f, 1.5f, -0.7f, 1.0f};
  SamplingOptions o;
  o.temperature = 0.7;
  Rng rng(11);
  const int n = 200000;
  std::vector<int> count(4, 0);
  for (int i = 0; i < n; ++i) ++count[sample_token(logits, 4, o, rng)];
  double z = 0;
  for (float l : logits) z += std::exp(l / 0.7);
  for (int v = 0; v < 4; ++v) {
    const double p = std::exp(logits[v] / 0.7) / z;
    // 5 standard deviations of a binomial count
    EXPECT_NEAR(count[v], n * p, 5 * std::sqrt(n * p * (1 - p))) << v;
  }
}

// top_k keeps every id whose logit is not below the k-th (transformers' TopKLogitsWarper,
// nanoGPT's `logits[logits < v[:, [-1]]] = -inf`): three ids tied at the top with top_k 2 are
// each drawn a third of the time.
TEST(Sampling, TopKKeepsTheIdsTiedWithTheKth) {
  const float logits[5] = {3.0f, 1.0f, 3.0f, 2.0f, 3.0f};
  SamplingOptions o;
  o.temperature = 1.0;
  o.top_k = 2;
  Rng rng(5);
  const int n = 30000;
  std::vector<int> count(5, 0);
  for (int i = 0; i < n; ++i) ++count[sample_token(logits, 5, o, rng)];
  EXPECT_EQ(count[1] + count[3], 0);
  for (int v : {0, 2, 4}) EXPECT_NEAR(count[v], n / 3.0, 5 * std::sqrt(n * (1 / 3.0) * (2 / 3.0)));
}

namespace {
// V logits drawn from N(0, spread^2), every `every`-th a copy of the one at i / div (ties), and
// the ids in the definition's order: descending logit, ties by id.
std::pair<std::vector<float>, std::vector<int32_t>> tied_logits(int64_t V, double spread,
                                                                uint64_t seed, int64_t every,
                                                                int64_t div) {
  std::vector<float> logits(V);
  Rng init(seed);
  for (float& l : logits) l = static_cast<float>(init.normal() * spread);
  for (int64_t i = 0; i < V; i += every) logits[i] = logits[i / div];
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  return {logits, order};
}
}  // namespace

// top_k and top_p keep the sets they define over the order by logit (ties: lower id first), and
// sample within them by the renormalised tempered softmax: a vocabulary of 3000 with ties, a
// nucleus of a few ids and one of most of the vocabulary, top_k alone and with top_p; against
// the definition computed here in double.
TEST(Sampling, TopKAndNucleusSampleTheSetsTheyDefine) {
  const int64_t V = 3000;
  for (double spread : {0.05, 3.0}) {  // nearly flat; peaked
    const auto [logits, order] = tied_logits(V, spread, 5, 7, 2);
    for (auto [top_k, top_p] :
         std::vector<std::pair<int64_t, double>>{{0, 0.9}, {0, 0.3}, {40, 1.0}, {2000, 0.8}}) {
      SamplingOptions o;
      o.temperature = 0.9;
      o.top_k = top_k;
      o.top_p = top_p;
      // The set by the definition, and each member's probability within it.
      int64_t k = top_k > 0 ? top_k : V;
      while (k < V && logits[order[k]] == logits[order[k - 1]]) ++k;  // ties with the k-th stay
      std::vector<double> w(k);
      double z = 0;
      for (int64_t i = 0; i < k; ++i) z += w[i] = std::exp(logits[order[i]] / o.temperature);
      int64_t keep = k;
      double acc = 0;
      for (int64_t i = 0; i < k && top_p < 1; ++i)
        if ((acc += w[i] / z) >= top_p) {
          keep = i + 1;
          break;
        }
      const double mass = std::accumulate(w.begin(), w.begin() + keep, 0.0);
      std::vector<int64_t> rank(V, -1);
      for (int64_t i = 0; i < keep; ++i) rank[order[i]] = i;
      Rng rng(13);
      const int n = 6000;
      std::vector<int> count(keep, 0);
      for (int d = 0; d < n; ++d) {
        const int32_t id = sample_token(logits.data(), V, o, rng);
        ASSERT_GE(rank[id], 0) << "id " << id << " outside the set: spread " << spread << " top_k "
                               << top_k << " top_p " << top_p;
        ++count[rank[id]];
      }
      // The first, middle and last members, and the first and second halves of the set.
      auto expect = [&](int64_t lo, int64_t hi) {
        int c = 0;
        double p = 0;
        for (int64_t i = lo; i < hi; ++i) c += count[i], p += w[i] / mass;
        EXPECT_NEAR(c, n * p, 5 * std::sqrt(n * p * (1 - p)) + 1)
            << "ranks [" << lo << ", " << hi << ") of " << keep << ": spread " << spread
            << " top_k " << top_k << " top_p " << top_p;
      };
      expect(0, 1);
      expect(keep / 2, keep / 2 + 1);
      expect(keep - 1, keep);
      expect(0, keep / 2);
      if (spread < 1 && top_k == 0 && top_p == 0.9) {
        EXPECT_GT(keep, 1024);  // most of the vocabulary
      }
    }
  }
}

// The sets themselves, exactly: the nucleus found by selection (and the top k by a partial sort)
// against the definition's sort, over flat to peaked distributions with ties, vocabularies
// where the selection partitions many times, nuclei from one id to nearly all.
TEST(Sampling, SetsAreTheDefinitionsExactly) {
  for (int64_t V : {50, 3000, 50257})
    for (double spread : {0.01, 0.2, 1.0, 4.0})
      for (uint64_t seed : {1, 2, 3}) {
        const auto [logits, order] =
            tied_logits(V, spread, seed * 100 + static_cast<uint64_t>(spread * 10), 5, 3);
        for (int64_t top_k : {0, 7, 1000})
          for (double top_p : {0.05, 0.5, 0.9, 0.999, 1.0}) {
            SamplingOptions o;
            o.temperature = 0.7;
            o.top_k = top_k;
            o.top_p = top_p;
            int64_t k = top_k > 0 && top_k < V ? top_k : V;
            while (k < V && logits[order[k]] == logits[order[k - 1]]) ++k;  // ties stay
            std::vector<double> w(k);
            double z = 0;
            for (int64_t i = 0; i < k; ++i)
              z += w[i] = std::exp((logits[order[i]] - logits[order[0]]) / 0.7);
            int64_t keep = k;
            double acc = 0;
            for (int64_t i = 0; i < k && top_p < 1; ++i)
              if ((acc += w[i]) >= top_p * z) {
                keep = i + 1;
                break;
              }
            std::vector<int32_t> want(order.begin(), order.begin() + keep);
            std::sort(want.begin(), want.end());
            ASSERT_EQ(sampling_set(logits.data(), V, o), want)
                << "V " << V << " spread " << spread << " seed " << seed << " top_k " << top_k
                << " top_p " << top_p << " (" << keep << " ids)";
          }
      }
}

// A session (a chat) keeps the cache between calls: a prompt that extends the last prompt and its
// reply runs only its new tokens (the cache growing to hold them), one that departs early runs
// whole, and either generates what a fresh call does (greedy); a stop token, max_tokens 0 and a
// prompt equal to what the cache holds leave it consistent. GPT-2, a Llama with a window
// shorter than the prompts, and bf16 weights (a bf16 cache).
TEST(Sampling, SessionRunsOnlyWhatTheCacheLacks) {
  ModelConfig g = model_preset("gpt2-tiny"), l = model_preset("llama3-tiny");
  l.sliding_window = 5;
  for (auto [cfg, bf16] : {std::pair{g, false}, {l, false}, {g, true}}) {
    cfg.max_seq_len = 64;
    const std::unique_ptr<Transformer> owner = small_model(cfg, bf16);
    Transformer& model = *owner;
    const std::string what = cfg.arch + (bf16 ? " bf16" : "");
    SamplingOptions o;
    o.temperature = 0;
    o.max_tokens = 6;
    GenerateSession session;
    GenerateStats st;
    auto run = [&](const std::vector<int32_t>& p, int64_t reused) {
      const std::vector<int32_t> got = generate(model, p, o, {}, &st, &session);
      EXPECT_EQ(got, generate(model, p, o)) << what << ", " << p.size() << " tokens";
      EXPECT_EQ(st.reused, reused) << what;
      EXPECT_EQ(st.prompt_tokens, static_cast<int64_t>(p.size()) - reused) << what;
      return got;
    };
    const std::vector<int32_t> p1 = {1, 9, 33, 4, 70, 12, 8, 50};
    const std::vector<int32_t> r1 = run(p1, 0);
    EXPECT_EQ(session.ids.size(), 8u + 5u);  // the reply's last token never ran
    EXPECT_EQ(session.cache.max_len, 14);
    std::vector<int32_t> p2 = p1;
    p2.insert(p2.end(), r1.begin(), r1.end());
    p2.insert(p2.end(), {3, 3, 61});
    run(p2, 13);  // (the cache grown, its 13 positions kept)
    EXPECT_GE(session.cache.max_len, static_cast<int64_t>(p2.size()) + 6);
    std::vector<int32_t> p3(p1.begin(), p1.begin() + 3);
    p3.insert(p3.end(), {20, 21, 22, 23});
    run(p3, 0);  // 3 in common, 4 more: run whole
    const std::vector<int32_t> held = session.ids;
    run(held, static_cast<int64_t>(held.size()) - 1);  // all held: the last one runs again
    o.stop_tokens = {generate(model, p1, o)[0]};       // stops at once
    run(p1, 0);
    EXPECT_EQ(session.ids, p1);
    o.stop_tokens.clear();
    o.max_tokens = 0;
    EXPECT_TRUE(generate(model, p2, o, {}, &st, &session).empty());
    EXPECT_EQ(session.ids, p2);
    o.max_tokens = 6;
    std::vector<int32_t> p4 = p2;
    p4.push_back(7);
    run(p4, static_cast<int64_t>(p2.size()));
    session.reset();
    run(p4, 0);
  }
}

// Sequences decoded together (Transformer::decode's segments: one matmul over all their rows)
// give each the logits and cache a call of its own gives: a whole prompt (the tiled attention), a
// chunk of 3 after a prompt and a single token, in fp32 and with bf16 weights and caches (GPT-2;
// a Llama with a window and q/k norms).
TEST(Decode, SegmentsRunTogetherAsEachAlone) {
  ModelConfig l = model_preset("llama3-tiny");
  l.sliding_window = 6;
  ModelConfig q = l;  // q/k norms, in bf16
  q.qk_norm = true;
  for (auto [cfg, bf16] : {std::pair{model_preset("gpt2-tiny"), false},
                           {l, false},
                           {model_preset("gpt2-tiny"), true},
                           {q, true}}) {
    const std::unique_ptr<Transformer> owner = small_model(cfg, bf16);
    Transformer& model = *owner;
    const std::vector<int32_t> ids = {5, 17, 3, 88, 40, 2, 61, 9, 30, 71, 12, 50};
    // (prefix run before, segment start, segment length)
    const std::vector<std::array<int64_t, 2>> shape = {{0, 9}, {7, 3}, {10, 1}, {4, 1}};
    std::vector<KvCache> together, alone;
    std::vector<Tensor> want;
    std::vector<DecodeSegment> segs;
    for (const auto& [start, len] : shape) {
      together.push_back(model.make_cache(16));
      alone.push_back(model.make_cache(16));
      if (start > 0) {
        model.decode(together.back(), ids.data(), start, 0);
        model.decode(alone.back(), ids.data(), start, 0);
      }
      want.push_back(model.decode(alone.back(), ids.data() + start, len, start).clone());
    }
    for (size_t g = 0; g < shape.size(); ++g)
      segs.push_back({&together[g], ids.data() + shape[g][0], shape[g][1], shape[g][0]});
    const Tensor got = model.decode(segs);
    const int64_t V = model.config().vocab_size;
    ASSERT_EQ(got.size(0), 4);
    for (size_t g = 0; g < shape.size(); ++g) {
      double err = 0, ref = 0;
      for (int64_t v = 0; v < V; ++v) {
        err = std::max(err,
                       std::fabs(double(got.data<float>()[g * V + v]) - want[g].data<float>()[v]));
        ref = std::max(ref, std::fabs(double(want[g].data<float>()[v])));
      }
      // (bf16: the same rounded products summed in another order as the row counts differ)
      EXPECT_LT(err / ref, bf16 ? 2e-3 : 1e-5)
          << cfg.arch << (bf16 ? " bf16" : "") << " segment " << g;
      // The keys and values of every position the segment ran, in its own cache.
      const int64_t end = shape[g][0] + shape[g][1];
      for (int64_t layer = 0; layer < model.config().n_layer; ++layer)
        for (const auto& [a, b] : {std::pair{together[g].k[layer], alone[g].k[layer]},
                                   {together[g].v[layer], alone[g].v[layer]}}) {
          const Tensor af = a.dtype() == DType::kBF16 ? a.to(DType::kF32) : a;
          const Tensor bf = b.dtype() == DType::kBF16 ? b.to(DType::kF32) : b;
          const int64_t HS = af.size(2);
          for (int64_t hd = 0; hd < af.size(0); ++hd)
            for (int64_t t = 0; t < end * HS; ++t) {
              const float x = af.data<float>()[hd * 16 * HS + t],
                          y = bf.data<float>()[hd * 16 * HS + t];
              ASSERT_NEAR(x, y, (bf16 ? 1e-2 : 1e-5) * (1 + std::fabs(y)))
                  << cfg.arch << " segment " << g << " layer " << layer;
            }
        }
    }
  }
}

// generate_batch: each prompt's continuation is generate()'s with seed + its index, whatever the
// batch's width (a prompt running beside other sequences' tokens, sequences ending early on the
// stop token or at the context, max_tokens 0); on_done once per prompt.
TEST(Sampling, BatchGivesEachPromptItsOwnGeneration) {
  ModelConfig cfg = model_preset("llama3-tiny");
  cfg.max_seq_len = 24;
  const std::unique_ptr<Transformer> owner = small_model(cfg, false);
  Transformer& model = *owner;
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 9, 33},
      {4},
      {70, 12, 8, 50, 6, 6, 2},
      {3, 3},
      {11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30},  // 4 left
      {90, 1},
      {44, 45, 46, 47}};
  for (double temperature : {0.0, 0.9}) {
    SamplingOptions o;
    o.temperature = temperature;
    o.top_k = temperature > 0 ? 40 : 0;
    o.max_tokens = 9;
    o.seed = 21;
    SamplingOptions o1 = o;
    o1.seed = o.seed + 1;
    o.stop_tokens = {generate(model, prompts[1], o1)[3]};  // prompt 1 (at least) stops early
    std::vector<std::vector<int32_t>> want;
    for (size_t i = 0; i < prompts.size(); ++i) {
      SamplingOptions oi = o;
      oi.seed = o.seed + i;
      want.push_back(generate(model, prompts[i], oi));
    }
    EXPECT_LE(want[1].size(), 4u);
    EXPECT_EQ(want[4].size(), 4u);  // at the context
    for (int64_t width : {1, 3, 16}) {
      std::vector<int> calls(prompts.size());
      GenerateStats st;
      const auto got = generate_batch(
          model, prompts, o, width,
          [&](size_t i, const std::vector<int32_t>& ids) {
            ++calls[i];
            EXPECT_EQ(ids, want[i]) << "prompt " << i;
          },
          &st);
      EXPECT_EQ(got, want) << "width " << width << ", temperature " << temperature;
      EXPECT_EQ(calls, std::vector<int>(prompts.size(), 1));
      EXPECT_EQ(st.sequences, 7);
      EXPECT_EQ(st.prompt_tokens, 39);
    }
  }
  // Seeds given: each prompt's own (all the same here), as generate with that seed.
  SamplingOptions o;
  o.temperature = 0.9;
  o.max_tokens = 5;
  const std::vector<uint64_t> seeds(prompts.size(), 77);
  o.seed = 77;
  const auto seeded = generate_batch(model, prompts, o, 3, {}, nullptr, seeds);
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(seeded[i], generate(model, prompts[i], o)) << "prompt " << i;
  // Prompts past the 4096 rows one step takes: the second long one joins a step later, beside
  // the first's decoding.
  {
    ModelConfig big = cfg;
    big.max_seq_len = 3100;
    const std::unique_ptr<Transformer> m2 = small_model(big, false);
    std::vector<std::vector<int32_t>> longs(2, std::vector<int32_t>(3000));
    for (size_t j = 0; j < 3000; ++j) {
      longs[0][j] = static_cast<int32_t>(j * 7 % 97);
      longs[1][j] = static_cast<int32_t>(j * 13 % 97);
    }
    longs.push_back({5, 6, 7});
    SamplingOptions g;
    g.temperature = 0;
    g.max_tokens = 4;
    const auto got = generate_batch(*m2, longs, g, 3);
    for (size_t i = 0; i < longs.size(); ++i)
      EXPECT_EQ(got[i], generate(*m2, longs[i], g)) << "long prompt " << i;
  }
  SamplingOptions none;
  none.max_tokens = 0;
  EXPECT_EQ(generate_batch(model, prompts, none, 2),
            std::vector<std::vector<int32_t>>(prompts.size()));
  EXPECT_THROW(generate_batch(model, {{1, 2}, {}}, none, 2), Error);  // an empty prompt
}

// A --max-tokens near INT64_MAX generates up to the context instead of overflowing.
TEST(Sampling, HugeMaxTokensStopsAtTheContext) {
  ModelConfig cfg = model_preset("gpt2-tiny");
  cfg.vocab_size = 97;
  cfg.n_layer = 1;
  cfg.max_seq_len = 16;
  Transformer model(cfg);
  model.init_weights(3);
  SamplingOptions o;
  o.max_tokens = std::numeric_limits<int64_t>::max();
  const std::vector<int32_t> prompt = {1, 2, 3};
  EXPECT_EQ(generate(model, prompt, o, nullptr).size(), 13u);
}

}  // namespace lmforge
