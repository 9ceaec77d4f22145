// Sampling from a model with a KV cache: the prompt is run once, then one token per step.
// temperature 0 = greedy; top_k 0 and top_p 1 = off. Stops at max_tokens or any of stop_tokens.
//
//   SamplingOptions o{.max_tokens = 100, .temperature = 0.8, .top_k = 40, .top_p = 0.95, .seed =
//   1}; std::vector<int32_t> out = generate(model, prompt_ids, o, [](int32_t id) { print(id); });
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lmforge/core/rng.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {

struct SamplingOptions {
  int64_t max_tokens = 200;
  double temperature = 0.8;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 1337;
  // The ids that end a reply (sampled, then stop): the tokenizer's EOS, a model's own end ids
  // (generation_config.json's eos_token_id list), a chat's end of turn (<|im_end|>).
  std::vector<int32_t> stop_tokens;
  int64_t vocab_limit = 0;  // ids >= this (vocabulary padding) are never sampled; 0 = all

  bool stops_at(int32_t id) const {
    return std::find(stop_tokens.begin(), stop_tokens.end(), id) != stop_tokens.end();
  }
  void add_stop(int32_t id) {
    if (id >= 0 && !stops_at(id)) stop_tokens.push_back(id);
  }
};

// Throws Error naming the option for a value outside its range (max_tokens < 0, temperature < 0
// or not finite, top_k < 0, top_p outside (0, 1]): as the config's sample.* keys when
// config_keys, else as generate's flags.
void check_sampling(const SamplingOptions& o, bool config_keys);

// What generate() checks before any work (Error naming the problem): a prompt that is empty, does
// not fit the context or holds ids outside the vocabulary; sampling options as check_sampling,
// named as the sample.* keys when config_keys.
void check_generate(const ModelConfig& model, const std::vector<int32_t>& prompt,
                    const SamplingOptions& o, bool config_keys);

// Picks one id from logits (V) with the options above.
int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, Rng& rng);
// The ids sample_token draws from with a positive temperature (ascending): the top_k by logit
// (ties: lower id first), then the fewest of them whose tempered softmax mass reaches top_p.
std::vector<int32_t> sampling_set(const float* logits, int64_t V, const SamplingOptions& o);

// Where generate's time went: the prompt's forward (prefill) and everything after it (decode:
// new_tokens - 1 one-token forwards and new_tokens samplings, on_token included).
// reused: the prompt's first tokens whose keys and values a GenerateSession already held (not
// run again; prompt_tokens counts those that were).
// generate_batch's: sequences (> 0, 0 for generate's), decode_s the whole time (prompts and new
// tokens together).
struct GenerateStats {
  int64_t prompt_tokens = 0, new_tokens = 0, reused = 0, sequences = 0;
  double prefill_s = 0, decode_s = 0;
  std::string str() const;  // "prompt 136 tokens in 0.21 s (648 tok/s); 255 more in ..."
};

// A KV cache kept from one generate() call to the next (a chat's conversation): the next prompt's
// longest prefix in common with what the cache holds (ids: the earlier prompt and its reply but
// the last token) is not run again, unless what is left is longer than it (then the whole prompt
// runs, through the faster tiled attention). The cache grows as the conversation does. Another
// model's call starts it afresh.
struct GenerateSession {
  KvCache cache;
  std::vector<int32_t> ids;
  const Transformer* model = nullptr;  // whose keys and values the cache holds
  void reset() { ids.clear(); }
  // Room for `positions`, the first `keep` kept.
  void reserve(const Transformer& m, int64_t positions, int64_t keep);
};

// Returns the generated ids (without the prompt); calls on_token for each as it is produced.
std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o,
                              const std::function<void(int32_t)>& on_token = {},
                              GenerateStats* stats = nullptr, GenerateSession* session = nullptr);

// One continuation per prompt, up to `width` sequences decoding at once: each step's tokens run
// through the model together (Transformer::decode's segments), so the weights are read once for
// all of them, and a finished sequence's place goes to the next prompt, whose prompt runs beside
// the others' tokens (continuous batching; at most 4096 rows of new prompts in one step). Prompt i
// samples with seeds[i] (none given: o.seed + i): what generate() gives it with that seed, up to
// the rounding of matmuls over more rows. on_done(i, ids) as each sequence ends (in the order
// they end). Every prompt is checked as check_generate before any work.
std::vector<std::vector<int32_t>> generate_batch(
    Transformer& model, const std::vector<std::vector<int32_t>>& prompts, const SamplingOptions& o,
    int64_t width, const std::function<void(size_t, const std::vector<int32_t>&)>& on_done = {},
    GenerateStats* stats = nullptr, const std::vector<uint64_t>& seeds = {});

}  // namespace lmforge
