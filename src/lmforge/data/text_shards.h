// Plain text -> token shards, for the demo and small experiments (the data-pipeline
// issue's `lmforge prepare` is the general tool). The shards are cached under
// $LMFORGE_CACHE (default ~/.cache/lmforge) keyed by the text's path, size, mtime and split, so
// re-running a demo re-uses them; the tokenizer's fingerprint is part of the key. The last
// `val_fraction` of the text (cut at a newline) is the validation split; each split ends with
// the tokenizer's end-of-document token.
//
//   TextShards s = shards_from_text("demo:kjv", 0.05, *tok);   // s.train, s.val: shard paths
#pragma once

#include <string>

#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

struct TextShards {
  std::string train, val;
};

std::string cache_dir();  // $LMFORGE_CACHE or $HOME/.cache/lmforge, created if missing
// The demo corpus (the King James Bible from Debian's bible-kjv), produced once with
// `bible -f "Gen1:1-Rev22:21"`; throws Error saying how to install it when missing.
std::string demo_corpus_path();
// "bpe:N": a byte-level BPE of vocabulary N trained on the text of `spec` (a path or
// "demo:kjv") with `lmforge tokenizer train`'s trainer, cached under
// $LMFORGE_CACHE/tokenizers/; returns the tokenizer.json path.
std::string bpe_tokenizer_for_text(const std::string& spec, int64_t vocab_size);
// N of a data.tokenizer "bpe:N" (the digits alone); 0 for anything else ("bpe:2048abc" too).
int64_t bpe_spec_size(const std::string& spec);

TextShards shards_from_text(const std::string& spec, double val_fraction, const Tokenizer& tok);

}  // namespace lmforge
