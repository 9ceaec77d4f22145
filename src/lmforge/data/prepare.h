// lmforge prepare: text/JSONL (plain, .gz, .zst) -> token shards, per named source:
//   <output>/<source>/train-00000.bin, ..., val-00000.bin, ...   (docs/formats.md)
//   <output>/<source>/progress.json   resumable state, updated after each shard pair
//   <output>/summary.json             counts per source (documents, tokens, skipped by reason)
// Documents are read in order, tokenized in parallel batches (order kept), and each gets BOS
// (if the tokenizer has one) + tokens + EOS. A chat source (format: chat) encodes each
// conversation with its chat template instead (which frames it itself) and writes shards with a
// loss mask: only the assistant's tokens are targets. A document goes to validation when
// hash(seed, its text) < val_fraction: deterministic, independent of thread count and of the
// records around it.
// Shards close when the train shard reaches shard_tokens; the val shard closes with it, so every
// close is a consistent point to resume from. Output is byte-identical for the same inputs,
// tokenizer and options whatever the thread count or interruptions.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lmforge/data/documents.h"

namespace lmforge {

struct PrepareSource {
  std::string name;
  std::vector<std::string> inputs;  // files, directories, globs
  DocumentOptions doc;
};

struct PrepareOptions {
  std::vector<PrepareSource> sources;
  std::string output;
  std::string tokenizer = "byte";
  uint64_t shard_tokens = 100'000'000;
  double val_fraction = 0.0;
  uint64_t val_docs = 0;  // > 0: the first val_docs kept documents are validation (not a fraction)
  uint64_t seed = 1234;
  bool progress = true;           // a progress line on stderr (when it is a terminal)
  int64_t stop_after_shards = 0;  // > 0: stop with an error after that many train shards (tests)
};

// Reads a prepare YAML (keys in docs/config.md, "prepare"); unknown keys are errors.
PrepareOptions load_prepare_config(const std::string& path);
// Runs (or resumes) the job; returns the summary also written to <output>/summary.json.
nlohmann::json run_prepare(const PrepareOptions& options);

}  // namespace lmforge
