// BPE training: learns a byte-level BPE from text files and writes a Hugging Face
// tokenizer.json (GPT-4-style split pattern, ByteLevel alphabet) that both lmforge and HF
// `tokenizers` load and encode identically.
//
// Streaming: files are read in chunks and only the counts of distinct pre-tokens are kept, so
// memory is bounded by the vocabulary of the corpus, not its size. Deterministic: the most
// frequent pair merges first, ties broken by the smaller (left id, right id); chunk counts are
// summed, so the result does not depend on the thread count.
//
//   BpeTrainOptions o; o.vocab_size = 8192;
//   BpeTrainResult r = train_bpe({"corpus.txt"}, o);
//   write_file_atomic("tokenizer.json", r.tokenizer_json);
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lmforge {

struct BpeTrainOptions {
  int64_t vocab_size = 8192;  // bytes (256) + merges + specials
  std::string pattern;        // "" = the GPT-4 (cl100k) pattern
  std::vector<std::string> specials = {"<|endoftext|>"};
  int64_t min_frequency = 2;  // pairs seen fewer times are not merged
  // At most this many bytes of the inputs, in order (0: all of them): a text's share before its
  // held-out part (data/text_shards.h).
  uint64_t max_bytes = 0;
};

struct BpeTrainResult {
  std::string tokenizer_json;
  int64_t merges = 0;
  int64_t vocab_size = 0;
  uint64_t bytes_read = 0;
  uint64_t distinct_pieces = 0;
};

BpeTrainResult train_bpe(const std::vector<std::string>& files, const BpeTrainOptions& options);

}  // namespace lmforge
