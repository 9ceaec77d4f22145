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
    fail("{} has {} tokens but model.max_seq_len is {}: no room for a new one; shorten it{}", what,
         prompt.size(), c.max_seq_len, prompt.size() == 1 ? " (or raise model.max_seq_len)" : "");
  for (int32_t id : prompt)
    if (id < 0 || id >= c.vocab_size)
      fail("generate: prompt token {} outside the model's vocabulary of {}", id, c.vocab_size);
}

namespace {

// The ids top_k / top_p keep (ids) and their weights (w), in the order draws walk them; weights
// relative to the top logit (max_logit) before the temperature divides, so the top id weighs
// exactly 1 even where logit / temperature overflows (a tiny temperature, an infinite logit:
// sampling then becomes greedy, not NaN). Neither option set: ids empty, meaning every id in id
// order (w for all).
struct Candidates {
  std::vector<int32_t> ids;
  std::vector<double> w;
};

Candidates candidates(const float* logits, int64_t V, const SamplingOptions& o, double max_logit) {
  auto weight = [&](int64_t i) {
    return std::exp((static_cast<double>(logits[i]) - max_logit) / o.temperature);
  };
  int64_t k = (o.top_k > 0 && o.top_k < V) ? o.top_k : V;
  Candidates c;
  if (k == V && o.top_p >= 1) {  // the whole softmax: no order needed
    c.w.resize(V);
    for (int64_t i = 0; i < V; ++i) c.w[i] = weight(i);
    return c;
  }
  // The candidates in descending order of logit (ties: lower id first: a strict order, so the
  // top k and the nucleus are sets of their own).
  std::vector<int32_t>& idx = c.ids;
  idx.resize(V);
  std::iota(idx.begin(), idx.end(), 0);
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  auto keep = [&](int64_t n, std::vector<double> w) {  // the first n of idx, w theirs
    idx.resize(n);
    w.resize(n);
    c.w = std::move(w);
    return c;
  };
  if (k < V) {  // the top k in order, then the nucleus within them (its mass theirs)
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
    // Ids tied with the k-th logit stay, as transformers' TopKLogitsWarper and nanoGPT keep
    // every logit not below it (in id order, as `before` puts ties).
    const float kth = logits[idx[k - 1]];
    const auto tied =
        std::partition(idx.begin() + k, idx.end(), [&](int32_t i) { return logits[i] == kth; });
    std::sort(idx.begin() + k, tied);
    k = tied - idx.begin();
    std::vector<double> w(k);
    for (int64_t i = 0; i < k; ++i) w[i] = weight(idx[i]);
    if (o.top_p >= 1) return keep(k, std::move(w));
    const double mass = std::accumulate(w.begin(), w.end(), 0.0);
    double acc = 0;
    for (int64_t i = 0; i < k; ++i)
      if ((acc += w[i]) >= o.top_p * mass) return keep(i + 1, std::move(w));
    return keep(k, std::move(w));
  }
  // The nucleus of the whole vocabulary: the fewest first ids in that order whose mass reaches
  // top_p, found by a selection on the mass (expected linear time; sorting a flat distribution's
  // nucleus of tens of thousands of ids cost more than the forward): partition [lo, hi) around
  // a pivot id and keep the side where the running mass crosses the target. Ids [0, lo) come
  // before every id of [lo, hi) and hold `acc` of the mass.
  std::vector<double> w(V);
  double mass = 0;
  for (int64_t i = 0; i < V; ++i) mass += w[i] = weight(i);
  const double target = o.top_p * mass;
  int64_t lo = 0, hi = V, n = -1;
  double acc = 0;
  while (hi - lo > 64 && n < 0) {
    const int32_t pivot = idx[lo + (hi - lo) / 2];
    const auto mid = std::partition(idx.begin() + lo, idx.begin() + hi,
                                    [&](int32_t i) { return before(i, pivot); }) -
                     idx.begin();
    std::iter_swap(std::find(idx.begin() + mid, idx.begin() + hi, pivot), idx.begin() + mid);
    double upper = 0;  // [lo, mid): before the pivot
    for (int64_t i = lo; i < mid; ++i) upper += w[idx[i]];
    if (acc + upper >= target) {
      hi = mid;
    } else if (acc + upper + w[pivot] >= target) {
      n = mid + 1;  // the pivot completes it
    } else {
      acc += upper + w[pivot];
      lo = mid + 1;
    }
  }
  if (n < 0) {  // the last few in order
    std::sort(idx.begin() + lo, idx.begin() + hi, before);
    n = hi;
    for (int64_t i = lo; i < hi; ++i)
      if ((acc += w[idx[i]]) >= target) {
        n = i + 1;
        break;
      }
  }
  std::vector<double> kept(n);
  for (int64_t i = 0; i < n; ++i) kept[i] = w[idx[i]];
  return keep(n, std::move(kept));
}

}  // namespace

std::vector<int32_t> sampling_set(const float* logits, int64_t V, const SamplingOptions& o) {
  const double top = *std::max_element(logits, logits + V);
  std::vector<int32_t> ids = candidates(logits, V, o, top).ids;
  if (ids.empty()) {
    ids.resize(V);
    std::iota(ids.begin(), ids.end(), 0);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, Rng& rng) {
  // (greedy too: NaN compares false, so a diverged model would decode id 0 forever)
  for (int64_t i = 0; i < V; ++i)
    if (std::isnan(logits[i]))
      fail("generate: the model's logits are NaN (id {}); the weights have diverged", i);
  const auto best = static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  if (o.temperature <= 0) return best;
  const double top = logits[best];
  if (std::isinf(top)) return best;
  const Candidates c = candidates(logits, V, o, top);
  const double sum = std::accumulate(c.w.begin(), c.w.end(), 0.0);
  double r = rng.uniform() * sum, acc = 0;
  for (size_t i = 0; i < c.w.size(); ++i) {
    acc += c.w[i];
    if (r < acc) return c.ids.empty() ? static_cast<int32_t>(i) : c.ids[i];
  }
  return c.ids.empty() ? best : c.ids.back();  // (rounding at the very end of the mass)
}

std::string GenerateStats::str() const {
  auto rate = [](int64_t n, double s) { return s > 0 ? static_cast<double>(n) / s : 0.0; };
  if (sequences > 0)
    return fmt::format(
        "{} sequences: {} prompt tokens and {} new tokens in {:.3f} s ({:.1f} new "
        "tok/s)",
        sequences, prompt_tokens, new_tokens, decode_s, rate(new_tokens, decode_s));
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

namespace {
// The positions a sequence of prompt P ends at (the prompt and up to max_tokens, within the
// context), the ids sampled from (not the vocabulary's padding), and whether a sampled id at
// position `pos` (the cache holding pos tokens) ends it.
int64_t end_position(const ModelConfig& c, int64_t P, const SamplingOptions& o) {
  return P + std::min<int64_t>(o.max_tokens, c.max_seq_len - P);
}
int64_t sampled_ids(const ModelConfig& c, const SamplingOptions& o) {
  return o.vocab_limit > 0 ? std::min(o.vocab_limit, c.vocab_size) : c.vocab_size;
}
bool ends(int32_t id, int64_t pos, int64_t total, const SamplingOptions& o) {
  return o.stops_at(id) || pos + 1 >= total;
}
}  // namespace

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o,
                              const std::function<void(int32_t)>& on_token, GenerateStats* stats,
                              GenerateSession* session) {
  const ModelConfig& c = model.config();
  check_generate(c, prompt, o, /*config_keys=*/false);
  const int64_t P = static_cast<int64_t>(prompt.size());  // < max_seq_len (check_generate)
  const int64_t total = end_position(c, P, o);
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
    int32_t id = sample_token(logits.data<float>(), sampled_ids(c, o), o, rng);
    out.push_back(id);
    if (on_token) on_token(id);
    if (ends(id, pos, total, o)) break;
    logits = model.decode(cache, &id, 1, pos);
    ++pos;
  }
  if (stats)
    *stats = {.prompt_tokens = P - reused,
              .new_tokens = static_cast<int64_t>(out.size()),
              .reused = reused,
              .prefill_s = std::chrono::duration<double>(t1 - t0).count(),
              .decode_s = std::chrono::duration<double>(Clock::now() - t1).count()};
  if (session) {  // what the cache now holds: the prompt and the reply but its last token
    session->ids = prompt;
    session->ids.insert(session->ids.end(), out.begin(), out.end() - (out.empty() ? 0 : 1));
  }
  return out;
}

std::vector<std::vector<int32_t>> generate_batch(
    Transformer& model, const std::vector<std::vector<int32_t>>& prompts, const SamplingOptions& o,
    int64_t width, const std::function<void(size_t, const std::vector<int32_t>&)>& on_done,
    GenerateStats* stats, const std::vector<uint64_t>& seeds) {
  const ModelConfig& c = model.config();
  LMF_CHECK(width > 0, "generate_batch: width {}", width);
  LMF_CHECK(seeds.empty() || seeds.size() == prompts.size(), "generate_batch: {} seeds, {} prompts",
            seeds.size(), prompts.size());
  constexpr int64_t kPrefillRows = 4096;
  for (const std::vector<int32_t>& p : prompts) check_generate(c, p, o, /*config_keys=*/false);
  struct Slot {
    size_t i;  // which prompt
    KvCache cache;
    Rng rng;
    int64_t pos = 0, total = 0;  // the tokens the cache holds; where the sequence ends
    int32_t last = -1;           // the newest sampled id (not yet run)
  };
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<Slot> active;
  size_t next = 0;
  GenerateStats st;
  st.sequences = static_cast<int64_t>(prompts.size());
  const auto t0 = std::chrono::steady_clock::now();
  auto finish = [&](size_t i) {
    st.new_tokens += static_cast<int64_t>(out[i].size());
    if (on_done) on_done(i, out[i]);
  };
  for (;;) {
    // Free slots take the next prompts, up to kPrefillRows of prompt in one call (its buffers
    // hold every row; a longer one is taken alone, beside the sequences decoding); a prompt with
    // nothing to generate ends at once.
    int64_t prefill = 0;
    while (static_cast<int64_t>(active.size()) < width && next < prompts.size()) {
      const size_t i = next;
      const auto P = static_cast<int64_t>(prompts[i].size());
      if (prefill > 0 && prefill + P > kPrefillRows) break;
      ++next;
      const int64_t total = end_position(c, P, o);
      if (total == P) {
        finish(i);
        continue;
      }
      active.push_back(
          {i, model.make_cache(total), Rng(seeds.empty() ? o.seed + i : seeds[i]), 0, total, -1});
      st.prompt_tokens += P;
      prefill += P;
    }
    if (active.empty()) break;
    std::vector<DecodeSegment> segs;
    for (Slot& s : active)
      segs.push_back(s.pos == 0 ? DecodeSegment{&s.cache, prompts[s.i].data(),
                                                static_cast<int64_t>(prompts[s.i].size()), 0}
                                : DecodeSegment{&s.cache, &s.last, 1, s.pos});
    const Tensor logits = model.decode(segs);
    std::vector<Slot> going;
    for (size_t k = 0; k < active.size(); ++k) {
      Slot& s = active[k];
      s.pos += segs[k].n;
      s.last = sample_token(logits.data<float>() + static_cast<int64_t>(k) * c.vocab_size,
                            sampled_ids(c, o), o, s.rng);
      out[s.i].push_back(s.last);
      if (ends(s.last, s.pos, s.total, o))
        finish(s.i);
      else
        going.push_back(std::move(s));
    }
    active = std::move(going);
  }
  st.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stats) *stats = st;
  return out;
}

}  // namespace lmforge
