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
// $LMFORGE_CACHE/tokenizers/; returns the tokenizer.json path. Where the text is also split
// (val_fraction > 0), on its training share alone: validation is text the tokenizer never saw.
// With train_if_missing false, the cached one's path or "" (nothing trained).
std::string bpe_tokenizer_for_text(const std::string& spec, int64_t vocab_size,
                                   double val_fraction = 0, bool train_if_missing = true);
// Where shards_from_text cuts `text`: its last `val_fraction` held out, from a line's start when
// one is within half that share before the cut (else from a character's start).
size_t held_out_cut(const std::string& text, double val_fraction);
// N of a data.tokenizer "bpe:N" (the digits alone); 0 for anything else ("bpe:2048abc" too).
int64_t bpe_spec_size(const std::string& spec);

TextShards shards_from_text(const std::string& spec, double val_fraction, const Tokenizer& tok);

}  // namespace lmforge
