#include "lmforge/data/loader.h"

#include "lmforge/core/error.h"

namespace lmforge {

Loader::Loader(const std::vector<std::string>& paths, int64_t B, int64_t T, uint64_t seed)
    : B_(B), T_(T), rng_(seed) {
  for (const std::string& p : paths) {
    shards_.push_back(TokenShard::open(p));
    int64_t n = shards_.back().size();
    windows_.push_back(n > T ? n - T : 0);
    total_ += n;
    total_windows_ += windows_.back();
  }
  if (total_windows_ == 0)
    fail(
        "{}: {} tokens in all, too few for one window of train.seq_len+1={}; use more data or a "
        "shorter train.seq_len",
        paths.empty() ? std::string("data") : paths.front(), total_, T + 1);
}

void Loader::window(int64_t g, int32_t* tok, int32_t* tgt) const {
  size_t s = 0;
  while (g >= windows_[s]) g -= windows_[s++];
  const TokenShard& sh = shards_[s];
  for (int64_t t = 0; t < T_; ++t) {
    tok[t] = static_cast<int32_t>(sh[g + t]);
    tgt[t] = static_cast<int32_t>(sh[g + t + 1]);
  }
}

void Loader::next(const Tensor& tokens, const Tensor& targets) {
  int32_t* tok = tokens.data<int32_t>();
  int32_t* tgt = targets.data<int32_t>();
  for (int64_t b = 0; b < B_; ++b)
    window(static_cast<int64_t>(rng_.below(static_cast<uint64_t>(total_windows_))), tok + b * T_,
           tgt + b * T_);
}

void Loader::sequential(int64_t i, const Tensor& tokens, const Tensor& targets) const {
  int32_t* tok = tokens.data<int32_t>();
  int32_t* tgt = targets.data<int32_t>();
  int64_t per_batch = B_ * T_;
  for (int64_t b = 0; b < B_; ++b) {
    int64_t start = ((i * per_batch + b * T_) % total_windows_);
    window(start, tok + b * T_, tgt + b * T_);
  }
}

void Loader::check_vocab(int64_t vocab_size, const std::string& key) const {
  for (const TokenShard& s : shards_) {
    uint32_t mx = s.max_token();
    if (static_cast<int64_t>(mx) >= vocab_size)
      fail(
          "{}: {} holds token id {} but model.vocab_size is {}; the shards were made with a "
          "different tokenizer, re-create them or set model.vocab_size",
          key, s.path(), mx, vocab_size);
  }
}

void Loader::check_tokenizer(const Tokenizer& tok, const std::string& key) const {
  for (const TokenShard& s : shards_) {
    const ShardTokenizerInfo& t = s.tokenizer();
    if (!t.fingerprint.empty() && t.fingerprint != tok.fingerprint())
      fail(
          "{}: {} was made with tokenizer {} (fingerprint {}, {} ids) but data.tokenizer is {} "
          "({}, fingerprint {}, {} ids); re-run prepare with it or set data.tokenizer to the "
          "shards' tokenizer",
          key, s.path(), t.kind, t.fingerprint, t.vocab_size, tok.source(), tok.kind(),
          tok.fingerprint(), tok.vocab_size());
  }
}

}  // namespace lmforge
