// Loader: batches of (tokens, targets) windows from token shards. Training batches are random
// windows of T+1 tokens drawn by a seeded Rng whose state is saved in checkpoints, so a resumed
// run sees exactly the batches an uninterrupted one would. Validation batches are fixed,
// non-overlapping windows from the start of the validation shards.
//
//   Loader train(expand_shards(cfg.data.train, "data.train"), B, T, seed);
//   train.next(tokens, targets);   // (B, T) int32 each
#pragma once

#include <string>
#include <vector>

#include "lmforge/core/rng.h"
#include "lmforge/core/tensor.h"
#include "lmforge/data/shard.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

class Loader {
 public:
  Loader(const std::vector<std::string>& paths, int64_t B, int64_t T, uint64_t seed);
  void next(const Tensor& tokens, const Tensor& targets);
  // Batch i of the fixed sequential windows (wraps around).
  void sequential(int64_t i, const Tensor& tokens, const Tensor& targets) const;
  int64_t num_tokens() const { return total_; }
  // Throws Error (naming `key`) if any token id is >= vocab_size: shards made with another
  // tokenizer than the model's.
  void check_vocab(int64_t vocab_size, const std::string& key) const;
  // Throws Error naming both tokenizers when a shard records a different tokenizer than `tok`
  // (version-1 shards record none and are only checked by check_vocab).
  void check_tokenizer(const Tokenizer& tok, const std::string& key) const;

  Rng::State state() const { return rng_.state(); }
  void set_state(const Rng::State& s) { rng_.set_state(s); }

 private:
  void window(int64_t global_start, int32_t* tok, int32_t* tgt) const;
  std::vector<TokenShard> shards_;
  std::vector<int64_t> windows_;  // per shard: number of valid window starts (n - T)
  int64_t B_, T_, total_ = 0, total_windows_ = 0;
  Rng rng_;
};

}  // namespace lmforge
