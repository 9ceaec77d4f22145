#include "lmforge/eval/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "lmforge/core/error.h"

namespace lmforge {

void check_sampling(const SamplingOptions& o, bool config_keys) {
  auto name = [&](const char* key, const char* flag) { return config_keys ? key : flag; };
  if (o.max_tokens < 0)
    fail("{}: must be >= 0, got {}", name("sample.max_tokens", "--max-tokens"), o.max_tokens);
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature))
    fail("{}: must be >= 0 (0 = greedy), got {}", name("sample.temperature", "--temperature"),
         o.temperature);
  if (o.top_k < 0)
    fail("{}: must be >= 0 (0 = off), got {}", name("sample.top_k", "--top-k"), o.top_k);
  if (!(o.top_p > 0 && o.top_p <= 1))
    fail("{}: must be in (0, 1] (1 = off), got {}", name("sample.top_p", "--top-p"), o.top_p);
}

void check_generate(const ModelConfig& c, const std::vector<int32_t>& prompt,
                    const SamplingOptions& o, bool config_keys) {
  const char* what = config_keys ? "sample.prompt" : "generate: the prompt";
  if (prompt.empty()) fail("{} is empty; pass {}", what, config_keys ? "some text" : "--prompt");
  check_sampling(o, config_keys);
  if (static_cast<int64_t>(prompt.size()) >= c.max_seq_len)
    fail("{} has {} tokens but model.max_seq_len is {}; shorten it", what, prompt.size(),
         c.max_seq_len);
  for (int32_t id : prompt)
    if (id < 0 || id >= c.vocab_size)
      fail("generate: prompt token {} outside the model's vocabulary of {}", id, c.vocab_size);
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, Rng& rng) {
  if (o.temperature <= 0)
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  for (int64_t i = 0; i < V; ++i)
    if (std::isnan(logits[i]))
      fail("generate: the model's logits are NaN (id {}); the weights have diverged", i);
  std::vector<int32_t> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  // Sort descending by logit (stable: ties keep id order, so sampling is reproducible).
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t k = (o.top_k > 0 && o.top_k < V) ? o.top_k : V;
  std::vector<double> p(k);
  // Relative to the top logit before dividing: the top token weighs exactly 1 even where
  // logit / temperature overflows (a tiny temperature, an infinite logit), so sampling then
  // becomes greedy instead of NaN.
  const double top = logits[idx[0]];
  if (std::isinf(top)) return idx[0];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i)
    sum += p[i] = std::exp((static_cast<double>(logits[idx[i]]) - top) / o.temperature);
  if (o.top_p < 1) {  // nucleus: smallest prefix whose mass reaches top_p
    double acc = 0;
    int64_t keep = k;
    for (int64_t i = 0; i < k; ++i) {
      acc += p[i] / sum;
      if (acc >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
    k = keep;
    sum = std::accumulate(p.begin(), p.begin() + k, 0.0);
  }
  double r = rng.uniform() * sum, acc = 0;
  for (int64_t i = 0; i < k; ++i) {
    acc += p[i];
    if (r < acc) return idx[i];
  }
  return idx[k - 1];
}

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o,
                              const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = model.config();
  check_generate(c, prompt, o, /*config_keys=*/false);
  const int64_t P = static_cast<int64_t>(prompt.size());  // < max_seq_len (check_generate)
  const int64_t total = P + std::min<int64_t>(o.max_tokens, c.max_seq_len - P);
  KvCache cache = model.make_cache(total);
  Rng rng(o.seed);
  std::vector<int32_t> out;
  Tensor logits = model.decode(cache, prompt.data(), static_cast<int64_t>(prompt.size()), 0);
  int64_t pos = static_cast<int64_t>(prompt.size());
  while (pos < total) {
    int64_t V = o.vocab_limit > 0 ? std::min(o.vocab_limit, c.vocab_size) : c.vocab_size;
    int32_t id = sample_token(logits.data<float>(), V, o, rng);
    out.push_back(id);
    if (on_token) on_token(id);
    if (id == o.stop_token || id == o.end_of_turn || pos + 1 >= total) break;
    logits = model.decode(cache, &id, 1, pos);
    ++pos;
  }
  return out;
}

}  // namespace lmforge
