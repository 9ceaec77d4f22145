#include "lmforge/eval/generate.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
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
  const auto best = static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  if (o.temperature <= 0) return best;
  for (int64_t i = 0; i < V; ++i)
    if (std::isnan(logits[i]))
      fail("generate: the model's logits are NaN (id {}); the weights have diverged", i);
  // Weights relative to the top logit before dividing: the top token weighs exactly 1 even where
  // logit / temperature overflows (a tiny temperature, an infinite logit), so sampling then
  // becomes greedy instead of NaN.
  const double top = logits[best];
  if (std::isinf(top)) return best;
  auto weight = [&](int64_t i) {
    return std::exp((static_cast<double>(logits[i]) - top) / o.temperature);
  };
  const int64_t k = (o.top_k > 0 && o.top_k < V) ? o.top_k : V;
  // Draws one of ids[0 .. n) (null: the ids themselves) by the weights p.
  auto draw = [&](const int32_t* ids, const std::vector<double>& p, int64_t n) {
    const double sum = std::accumulate(p.begin(), p.begin() + n, 0.0);
    double r = rng.uniform() * sum, acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      acc += p[i];
      if (r < acc) return ids ? ids[i] : static_cast<int32_t>(i);
    }
    return ids ? ids[n - 1] : best;  // (rounding at the very end of the mass)
  };
  std::vector<double> p;
  if (k == V && o.top_p >= 1) {  // the whole softmax: no order needed
    p.resize(V);
    for (int64_t i = 0; i < V; ++i) p[i] = weight(i);
    return draw(nullptr, p, V);
  }
  // The candidates in descending order of logit (ties: lower id first), sorted only as far as
  // needed: the top k, or for the nucleus alone a prefix that usually holds the mass top_p.
  std::vector<int32_t> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  double mass = 0;  // of all k candidates
  if (k == V)
    for (int64_t i = 0; i < V; ++i) mass += weight(i);
  for (int64_t m = k == V ? std::min<int64_t>(V, 1024) : k;; m = k) {
    std::partial_sort(idx.begin(), idx.begin() + m, idx.end(), before);
    p.resize(m);
    for (int64_t i = 0; i < m; ++i) p[i] = weight(idx[i]);
    if (k < V) mass = std::accumulate(p.begin(), p.end(), 0.0);
    if (o.top_p >= 1) return draw(idx.data(), p, m);
    // nucleus: the smallest prefix whose mass reaches top_p
    double acc = 0;
    for (int64_t i = 0; i < m; ++i) {
      acc += p[i] / mass;
      if (acc >= o.top_p) return draw(idx.data(), p, i + 1);
    }
    if (m == k) return draw(idx.data(), p, m);
  }
}

std::string GenerateStats::str() const {
  auto rate = [](int64_t n, double s) { return s > 0 ? static_cast<double>(n) / s : 0.0; };
  return fmt::format(
      "prompt {} tokens in {:.3f} s ({:.1f} tok/s){}; {} new tokens in {:.3f} s after it ({:.1f} "
      "tok/s)",
      prompt_tokens, prefill_s, rate(prompt_tokens, prefill_s),
      reused ? fmt::format(" after {} reused", reused) : "", new_tokens, decode_s,
      rate(std::max<int64_t>(new_tokens - 1, 0), decode_s));
}

void GenerateSession::reserve(const Transformer& m, int64_t positions, int64_t keep) {
  if (cache.max_len >= positions) return;
  // Grown geometrically (within the context), the first `keep` positions copied over.
  const int64_t len = std::min(m.config().max_seq_len, std::max(positions, 2 * cache.max_len));
  KvCache grown = m.make_cache(len);
  auto copy = [&](const Tensor& from, const Tensor& to) {  // (NKV, max_len, HS) each
    const int64_t row = from.size(2) * static_cast<int64_t>(dtype_size(from.dtype()));
    for (int64_t h = 0; h < from.size(0); ++h)
      std::memcpy(static_cast<char*>(to.raw()) + h * len * row,
                  static_cast<const char*>(from.raw()) + h * cache.max_len * row, keep * row);
  };
  if (keep > 0)
    for (size_t l = 0; l < cache.k.size(); ++l) {
      copy(cache.k[l], grown.k[l]);
      copy(cache.v[l], grown.v[l]);
    }
  cache = std::move(grown);
}

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o,
                              const std::function<void(int32_t)>& on_token, GenerateStats* stats,
                              GenerateSession* session) {
  const ModelConfig& c = model.config();
  check_generate(c, prompt, o, /*config_keys=*/false);
  const int64_t P = static_cast<int64_t>(prompt.size());  // < max_seq_len (check_generate)
  const int64_t total = P + std::min<int64_t>(o.max_tokens, c.max_seq_len - P);
  KvCache local;
  int64_t reused = 0;  // the prompt's first tokens already in the session's cache
  if (session) {
    if (session->model != &model) *session = GenerateSession{{}, {}, &model};
    const auto held = static_cast<int64_t>(session->ids.size());
    while (reused < std::min(held, P - 1) && session->ids[reused] == prompt[reused]) ++reused;
    // What is left runs through the cache's attention a row at a time: worth it for a new turn
    // after a long conversation, not for a conversation whose start changed (oldest turns
    // dropped), which the prompt's tiled attention runs faster whole.
    if (P - reused > reused) reused = 0;
    session->ids.clear();  // (until this call ends well: an exception leaves nothing reusable)
    session->reserve(model, total, reused);
  } else {
    local = model.make_cache(total);
  }
  KvCache& cache = session ? session->cache : local;
  Rng rng(o.seed);
  std::vector<int32_t> out;
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  Tensor logits = model.decode(cache, prompt.data() + reused, P - reused, reused);
  const auto t1 = Clock::now();
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
  if (stats)
    *stats = {P - reused, static_cast<int64_t>(out.size()), reused,
              std::chrono::duration<double>(t1 - t0).count(),
              std::chrono::duration<double>(Clock::now() - t1).count()};
  if (session) {  // what the cache now holds: the prompt and the reply but its last token
    session->ids = prompt;
    session->ids.insert(session->ids.end(), out.begin(), out.end() - (out.empty() ? 0 : 1));
  }
  return out;
}

}  // namespace lmforge
