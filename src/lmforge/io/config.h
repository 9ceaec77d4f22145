// Config: the whole run as plain structs with defaults. YAML maps onto them key by key; unknown
// keys and wrong types are rejected with the file and key path; `--set a.b=c` overrides; the
// resolved config is written back as YAML into the run directory.
//
//   Config cfg = Config::defaults();
//   ConfigLoader loader(cfg);
//   loader.load_yaml_file("run.yaml");        // or load_yaml_text(embedded, "<embedded default>")
//   loader.set("train.lr=3e-4", "--set");
//   loader.finish();                           // applies model.preset first, then the overrides
//   std::string yaml = config_to_yaml(cfg);
//
// Keys are listed once, in fields() (config.cpp): that list is the config reference
// (docs/config.md) and drives loading, --set, dumping and checkpoint metadata.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "lmforge/models/config.h"

namespace lmforge {

struct DataConfig {
  // A UTF-8 text file tokenized into shards ("demo:kjv" = demo): the training data when `train`
  // is not set (its val_fraction held out validates unless `val` is set); with `train` set, only
  // what a "bpe:N" tokenizer trains on.
  std::string text;
  std::string train;  // token shard file(s): a path, a directory or a glob
  std::string val;    // validation shard(s); empty with `text` as the data = split from it
  double val_fraction = 0.05;
  std::string packing = "none";  // none (concatenate and chunk) | best_fit (whole documents)
  // "byte", "bpe:N" (trained on `text`), or a tokenizer file/directory (any format); with
  // init_from, unset or empty = the source's (such a run saves "").
  std::string tokenizer = "byte";
};

struct TrainConfig {
  int64_t steps = 1000;
  int64_t batch_size = 8;  // B (sequences per micro-batch)
  int64_t seq_len = 256;   // T
  int64_t grad_accum = 1;
  double lr = 1e-3;
  double min_lr = -1;  // -1: train.lr / 10 (resolved by the config loader and make_schedule)
  std::string schedule = "cosine";  // constant | cosine | linear | wsd | one_cycle
  int64_t warmup = 50;
  double decay_fraction = 0.2;  // wsd: share of the steps spent decaying to min_lr
  double div_factor = 25;       // one_cycle: starts at lr / div_factor
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  std::string optimizer = "adamw";  // adamw | muon (the blocks' matrices; AdamW for the rest)
  double muon_lr = 0;               // muon: its matrices' peak lr; 0 = train.lr
  double muon_momentum = 0.95;
  bool muon_nesterov = true;
  int64_t muon_ns_steps = 5;
  std::string muon_adjust_lr = "match_rms_adamw";  // match_rms_adamw | original
  double grad_clip = 1.0;                          // max global norm; 0 = off
  std::string activation_checkpointing = "none";   // none | selective | full (nn/block.h)
  double z_loss = 0;  // PaLM z-loss coefficient (1e-4 typical); 0 = off
  double neftune_alpha =
      0;  // NEFTune: uniform noise of alpha / sqrt(T C) on the embeddings; 0 = off
  std::string objective = "clm";      // clm (next-token loss; SFT on masked shards) | dpo | orpo |
                                      // simpo | kto | distill
  std::string teacher;                // distill: the teacher (a checkpoint or run dir, or hf:DIR)
  double distill_alpha = 0.5;         // distill: weight of the KL term (1 - alpha: cross-entropy)
  double distill_temperature = 2.0;   // distill: softmax temperature of teacher and student
  double dpo_beta = 0.1;              // DPO: strength of the KL penalty to the reference model
  double dpo_label_smoothing = 0;     // DPO: conservative DPO's probability of flipped labels
  std::string dpo_loss = "sigmoid";   // DPO: sigmoid | hinge | ipo (TRL's loss_type)
  double orpo_lambda = 0.1;           // ORPO: weight of the odds-ratio term (TRL's beta)
  double simpo_beta = 2.0;            // SimPO: reward scale
  double simpo_gamma = 0.5;           // SimPO: target reward margin
  double simpo_label_smoothing = 0;   // SimPO: share of preference labels assumed flipped
  double cpo_alpha = 0;               // SimPO: weight of the chosen responses' NLL (CPO-SimPO)
  double kto_beta = 0.1;              // KTO: reward scale (the KL penalty's strength)
  double kto_desirable_weight = 1;    // KTO: weight of the desirable responses' losses
  double kto_undesirable_weight = 1;  // KTO: weight of the undesirable responses' losses
  std::string kto_loss = "kto";       // KTO: kto | apo_zero_unpaired (TRL's loss_type)
  bool precompute_ref_logps = false;  // DPO: the reference's log-likelihoods once, then released
  double spike_zscore = 6;         // skip a step whose loss/grad norm z-score exceeds this; 0 = off
  int64_t spike_window = 100;      // steps in the rolling statistics
  int64_t max_skips = 10;          // consecutive skipped steps before the run stops
  std::string inject_fault;        // testing aid: nan@, spike@, kill@ or hang@STEP (1-based)
  std::string precision = "fp32";  // fp32 | bf16 (bf16 matmuls, fp32 master weights)
  std::string master_weights = "fp32";  // fp32 | bf16 (stochastic rounding; with bf16 precision)
  std::string device = "cpu";           // cpu | cuda | auto
  bool cuda_graphs = false;  // on a GPU: the step's kernels captured once, replayed (one process)
  uint64_t seed = 1337;
  int64_t eval_every = 100;     // 0 = never
  std::string hellaswag;        // HellaSwag JSONL scored at each evaluation (llm.c's); "" = off
  int64_t hellaswag_limit = 0;  // its first N examples; 0 = all
  int64_t eval_batches = 10;
  int64_t patience = 0;            // early stopping: evals without improvement; 0 = off
  double min_delta = 0;            // improvement that counts for patience and best
  int64_t checkpoint_every = 200;  // 0 = only at the end
  int64_t keep_last = 3;           // checkpoints kept; 0 = all
  bool save_best = true;           // a new best validation loss saved at its step
  int64_t log_every = 1;
  double peak_tflops = 0;  // the device's peak, for MFU in metrics; 0 = not reported
  int64_t profile_steps =
      0;  // op-level profile of this many steps after the first (core/profile.h)
};

struct RunConfig {
  std::string dir = "runs/default";
  bool dashboard = true;  // dir/dashboard.html: a self-reloading page of the run's charts
};

// Data parallelism across processes (dist/data_parallel.h); ignored by a single process except
// for strategy checks.
struct DistConfig {
  std::string strategy = "no-shard";  // no-shard | zero1 | grad-shard | full-shard | hybrid
  double bucket_mb = 25;              // gradient all-reduce/reduce-scatter bucket size
  bool offload = false;               // optimizer state (and full-shard parameters) in host arena
  double timeout = 600;               // seconds a collective may take before the job stops
  int64_t ranks_per_node = 0;         // 0 = as launched; declares nodes for hybrid
  std::string backend = "auto";       // auto | mpi | nccl | local
  int64_t tensor_parallel = 1;        // ranks sharing each block, any strategy across the groups
  bool sequence_parallel = false;     // and the rest split by rows among them (the same)
};

struct SampleConfig {  // printed after training when prompt is non-empty
  std::string prompt;
  int64_t max_tokens = 200;
  double temperature = 0.8;
  int64_t top_k = 0;
  double top_p = 0.95;
};

struct Config {
  ModelConfig model;
  std::string init_from;  // hf:DIR or an lmforge checkpoint/run directory (train/init_from.h)
  // Keys the user's config file or --set assigned (not the embedded default): with init_from,
  // model.* keys must agree with the source's architecture, and data.tokenizer, when given, with
  // its tokenizer. Filled by ConfigLoader; not itself a config key.
  std::set<std::string> keys_given;
  DataConfig data;
  TrainConfig train;
  RunConfig run;
  DistConfig dist;
  SampleConfig sample;
};

// One configurable field: its dotted key and where it lives.
struct ConfigField {
  std::string key;
  std::variant<int64_t*, uint64_t*, double*, bool*, std::string*> ptr;
  std::string help;
};
std::vector<ConfigField> fields(Config& cfg);
std::vector<ConfigField> model_fields(ModelConfig& m);  // keys without the "model." prefix

class ConfigLoader {
 public:
  explicit ConfigLoader(Config& cfg) : cfg_(cfg) {}
  void load_yaml_file(const std::string& path);
  // base: a starting point (the embedded default) whose model keys init_from may replace; keys
  // from other sources are the user's and must agree with init_from's architecture.
  void load_yaml_text(const std::string& text, const std::string& source, bool base = false);
  void set(const std::string& assignment, const std::string& source = "--set");  // "a.b=c"
  void finish();  // applies the last model.preset, then every other assignment in order

 private:
  struct Assignment {
    std::string key, value, source;
    bool base = false;
    bool yaml = false;  // from a file (an empty section there is no mistake)
  };
  Config& cfg_;
  std::vector<Assignment> pending_;
};

// Assigns `value` (text) to the field, or throws Error "<source>: <key>: expected ..., got ...".
void assign_field(const ConfigField& f, const std::string& value, const std::string& source);
std::string field_value(const ConfigField& f);
std::string config_to_yaml(Config& cfg);

}  // namespace lmforge
