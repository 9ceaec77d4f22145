// Loader: (tokens, targets) batches from prepared token shards.
//
// Each source (a shard path, directory or glob; several mix by weight: "a@0.7,b@0.3") is cut
// into samples of T+1 tokens once, at start-up:
//   packing "none":     consecutive windows of the shards (concatenate and chunk);
//   packing "best_fit": whole documents (from the shards' document index) packed best-fit
//                       decreasing into T+1 slots; documents longer than a slot are split. Unused
//                       slot tail is padding with ignored targets. positions (each token's place
//                       in its document; informational) and doc_ids number the documents of a
//                       row; the model keeps each document of a row to itself from doc_ids, its
//                       positions counted from the piece's start (nn/transformer.h).
// Shards with a loss mask (SFT) leave the targets it clears ignored.
// Each epoch visits every sample of a source once in a seeded random order. The order of samples
// is global, independent of the number of ranks: each next() takes the next B x W rows of that
// sequence (the global micro-batch) and rank r of W gets rows [r B, (r + 1) B), so ranks see
// disjoint data, and a run resumed with another number of ranks (same global batch or not)
// continues the same sequence. The state (RNG, per-source epoch and cursor, the same on every
// rank) is saved in checkpoints: a resumed run continues the exact sequence of samples.
//
//   Loader train(parse_data_spec(cfg.data.train, "data.train"), {B, T, seed});
//   Batch b = Batch::make(B, T);
//   train.next(b);                       // b.tokens, b.targets (B, T) int32
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lmforge/core/rng.h"
#include "lmforge/core/tensor.h"
#include "lmforge/data/shard.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

struct DataSourceSpec {
  std::string spec;  // as written
  std::vector<std::string> shards;
  double weight = 1.0;
};
// "SPEC[@WEIGHT],SPEC[@WEIGHT],..." -> sources; throws Error naming `key` on a bad weight or a
// spec that matches no shard.
std::vector<DataSourceSpec> parse_data_spec(const std::string& spec, const std::string& key);

// Throws Error for a data.packing other than none and best_fit.
void check_packing(const std::string& packing);

struct LoaderOptions {
  int64_t batch = 1, seq = 1;
  uint64_t seed = 0;
  std::string packing = "none";  // none | best_fit
  int64_t rank = 0, world = 1;
  int32_t pad_token = 0;
  int32_t ignore_index = -100;
  // Preference pairs (train.objective dpo, orpo): a sample is a pair of documents of paired
  // shards (prepare --format preference), filling rows 2j (chosen) and 2j+1 (rejected), each cut
  // to T+1 tokens; batch counts rows and must be even.
  bool pairs = false;
  // Unpaired preference rows (train.objective kto): a sample is one response with its prompt,
  // one row cut to T+1 tokens, labelled desirable or not (Batch::labels): each document of a
  // labelled shard (prepare --format unpaired), and each side of a paired shard (its chosen
  // side desirable, as TRL unpairs pairs for KTO).
  bool unpaired = false;
};

struct SampleId {
  int32_t source;
  int64_t index;  // the sample's index in its source's plan
  bool operator==(const SampleId&) const = default;
};

struct Batch {
  Tensor tokens, targets, positions, doc_ids;  // (B, T) int32 each
  // Unpaired preference rows (train.objective kto): per row 1 = a desirable response, 0 = an
  // undesirable one, -1 = none (padding, or not such a batch).
  std::vector<int8_t> labels;
  // The samples of its rows as the loader filled them (one per row, per pair of rows with
  // pairs); {-1, -1} for padding. Empty for batches filled by hand.
  std::vector<SampleId> samples;
  // Positions and doc_ids start zero (one document per row) for batches filled by hand; labels
  // -1.
  static Batch make(int64_t B, int64_t T);
};

// Per batch: its targets != ignore_index (the loss's token count).
std::vector<int64_t> target_counts(const std::vector<Batch>& batches,
                                   int32_t ignore_index = LoaderOptions{}.ignore_index);

class Loader {
 public:
  Loader(const std::vector<DataSourceSpec>& sources, const LoaderOptions& opt);
  void next(Batch& batch);
  // Validation: batch i of all samples in their natural order; rows past the last sample are
  // padding (no targets), so each sample counts once. sequential_batches() covers them all.
  void sequential(int64_t i, Batch& batch) const;
  int64_t sequential_batches() const;

  // Samples of the last next(), one per row (per pair of rows with pairs).
  const std::vector<SampleId>& last_samples() const { return last_; }
  int64_t num_tokens() const { return total_tokens_; }
  int64_t num_samples(int source) const { return sources_[source].samples(); }
  size_t num_sources() const { return sources_.size(); }
  // Per source: samples, documents cut by packing and by plain chunking (pairs: pairs cut by T,
  // and pairs_without_targets), slot fill.
  nlohmann::json stats() const;

  void check_vocab(int64_t vocab_size, const std::string& key) const;
  // Throws Error naming both tokenizers when a shard records a different tokenizer than `tok`
  // (version-1 shards record none and are only checked by check_vocab).
  void check_tokenizer(const Tokenizer& tok, const std::string& key) const;

  nlohmann::json state() const;
  void set_state(const nlohmann::json& s);

 private:
  // Rows of whole documents (data.packing best_fit), as plan_best_fit cuts and numbers them:
  // the loader state records the plan, so that a position saved under another is refused.
  bool packs_best_fit() const { return !o_.pairs && !o_.unpaired && o_.packing == "best_fit"; }
  static constexpr int kBestFitPlan = 2;
  struct Span {
    int32_t shard;
    int32_t len;
    int64_t start;
    int32_t pos0 = 0;  // position of the first token within its document
  };
  struct Source {
    std::string spec;
    double weight;
    std::vector<TokenShard> shards;
    std::vector<Span> spans;
    std::vector<int64_t> first_span;  // sample i = spans[first_span[i], first_span[i+1])
    int64_t docs = 0, cut_packed = 0, cut_chunked = 0, tokens = 0, filled = 0;
    int64_t empty_pairs = 0;  // pairs: a side without targets (its prompt fills T); unpaired: rows
    std::vector<int8_t> labels;  // unpaired: per sample, 1 = desirable
    int64_t epoch = 0, cursor = 0;
    std::vector<int64_t> order;  // permutation of the current epoch
    int64_t order_epoch = -1;
    int64_t samples() const { return static_cast<int64_t>(first_span.size()) - 1; }
  };
  void plan_chunks(Source& s);
  void plan_best_fit(Source& s);
  void plan_pairs(Source& s);  // and unpaired rows
  // Rows per sample: 2 with pairs, else 1.
  int64_t rows_per_sample() const { return o_.pairs ? 2 : 1; }
  // The sample's rows from `row` on: one row of its spans, or (pairs) one row per span.
  void fill_sample(const Source& s, int64_t sample, int64_t row, Batch& b) const;
  void fill_row(const Source& s, int64_t k0, int64_t k1, int64_t row, Batch& b) const;
  void pad_row(int64_t row, Batch& b) const;
  int64_t take(Source& s);

  LoaderOptions o_;
  std::vector<Source> sources_;
  std::vector<double> cumulative_;
  Rng rng_;
  std::vector<SampleId> last_;
  int64_t total_tokens_ = 0;
};

}  // namespace lmforge
