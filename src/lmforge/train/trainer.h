// The training loop for causal-LM pretraining:
//   for each step: lr = schedule(step); zero grads; grad_accum x (next batch, forward, backward);
//   clip to train.grad_clip; AdamW step; log; every eval_every: validation loss; every
//   checkpoint_every (and at the end): checkpoint.
// The run directory holds config.yaml (resolved), metrics.jsonl and checkpoints/.
//
//   Config cfg = ...;  TrainResult r = train(cfg);   // or train(cfg, {.from = "auto"})
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "lmforge/data/loader.h"
#include "lmforge/io/config.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/optim/schedule.h"
#include "lmforge/plan/planner.h"
#include "lmforge/train/init_from.h"

namespace lmforge {

struct SamplingOptions;

struct TrainResult {
  int64_t steps = 0;
  double first_loss = 0, last_loss = 0, last_val_loss = -1;
  std::string last_checkpoint;
  bool stopped_early = false;
  int interrupted = 0;  // the signal (SIGINT, SIGTERM) that stopped it after a checkpoint, or 0
};

// The learning-rate schedule train.* describes (validated; throws Error naming the key).
Schedule make_schedule(const TrainConfig& t);
// The optimizer's options from train.* (train.optimizer: AdamW, with Muon's keys when chosen);
// LoRA under bf16 master weights keeps the adapters' fp32 masters (AdamWOptions::fp32_masters).
AdamWOptions optimizer_options(const Config& cfg);

// Validation losses so far: the best (the lowest, as checkpoints/best names it) and early
// stopping's count, the evaluations since one improved on its reference by more than min_delta
// (the reference: the loss of the last evaluation that did; as Lightning's EarlyStopping beside
// its ModelCheckpoint). Saved in checkpoints.
class EvalHistory {
 public:
  explicit EvalHistory(const nlohmann::json& state = nullptr);
  // True if this is the new best; a non-finite loss never is (it counts as no improvement).
  bool add(int64_t step, double val_loss, double min_delta);
  double best() const { return best_; }
  int64_t best_step() const { return best_step_; }
  double reference() const { return reference_; }
  int64_t bad() const { return bad_; }
  nlohmann::json state() const;

 private:
  double best_ = 0, reference_ = 0;
  int64_t best_step_ = -1, bad_ = 0;
};

// How a run starts: `lmforge train`'s --resume, --start-step and --reset-optimizer.
struct ResumeOptions {
  // "" = fresh run (run.dir must not already hold checkpoints); "auto" = the newest checkpoint in
  // run.dir that verifies against its manifest (falling back past damaged ones); else a checkpoint
  // directory (verified) or a run directory.
  std::string from;
  // >= 0: continue as step N (the step counter, the LR schedule and the step numbers of later
  // checkpoints and metrics) instead of the checkpoint's step; the data loader still continues
  // from the checkpoint's position. Needs `from`.
  int64_t start_step = -1;
  // Load the weights only: fresh AdamW moments and optimizer step count 0 (bias correction starts
  // over); the step, schedule and data position still come from the checkpoint. Needs `from`.
  bool reset_optimizer = false;
};

TrainResult train(Config& cfg, const ResumeOptions& resume = {});

// Everything a run needs before its first step, from the config: init_from's source, the
// tokenizer, the loaders and the model (initialized or loaded, planned for B x T). Fills in
// cfg.model from init_from or the tokenizer (vocab_size 0). Writes nothing.
struct RunSetup {
  std::unique_ptr<InitSource> init;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Loader> train_data, val_data;  // val_data may be null
  std::unique_ptr<Transformer> model;
  // Under full-shard (without tensor parallelism) the model's initial values, its buffer left
  // unwritten: DataParallel makes each rank's shard from them (the seed's, or init_from's);
  // empty otherwise (the model holds them).
  ValueStream values;
  // train.objective dpo: the frozen reference model (the policy's initial weights), planned for
  // the same (B, T); null otherwise, or when reference_is_base: under LoRA from a source without
  // adapters the reference is the policy with its adapters off. Under tensor parallelism this
  // rank's share; under full-shard (without tensor parallelism) its values are left to a
  // DataParallel of its own, like the policy's (frozen_values).
  std::unique_ptr<Transformer> reference;
  bool reference_is_base = false;
  // train.objective distill: the teacher (train.teacher), planned for (B, T), set on the model;
  // made as the reference is (a share, a shard's values in frozen_values) from teacher_source,
  // whose whole architecture is teacher_config.
  std::unique_ptr<Transformer> teacher;
  std::unique_ptr<InitSource> teacher_source;
  ModelConfig teacher_config;
  // The reference's or the teacher's initial values under full-shard (see above); empty
  // otherwise.
  ValueStream frozen_values;
  // The frozen model a run scores with: the reference or the teacher (null if none).
  Transformer* frozen() const { return reference ? reference.get() : teacher.get(); }
};
// resume_from (ResumeOptions::from): a resumed run whose init_from can no longer be read (moved,
// deleted) takes what it gave (the architecture, the tokenizer, initial weights the checkpoint
// replaces) from the checkpoint it resumes; not DPO or KTO, whose reference it makes.
RunSetup setup_run(Config& cfg, const std::string& resume_from = "");
// A run resumed from `ckpt` with a config that leaves train.min_lr unset keeps the min_lr it was
// trained toward (the checkpoint's config.yaml's; unset, it resolves to train.lr / 10, once a
// fixed 1e-4), noted by `lead`; a train.lr below it is an Error. True when cfg.train.min_lr
// changed.
bool keep_resumed_min_lr(Config& cfg, const std::string& ckpt, bool lead);
// The training loader's seed (its epochs' order), saved in checkpoints' loader state.
inline uint64_t loader_seed(const TrainConfig& t) { return t.seed + 1; }
// On the CPU: an Error naming the need and the available memory when `local_ranks` ranks of one
// node cannot hold training_footprint() (plan/planner.h) and one micro-batch's `activations`
// (activation_bytes) each (before any allocation, which Linux would accept and later kill).
void check_training_fits(const ModelConfig& model, const FootprintOptions& o, double activations,
                         int local_ranks = 1);
// train.device as a Device: cpu, cuda (Error when no GPU is usable), auto (the GPU if any).
Device resolve_device(const std::string& device);
// Whether tensor parallelism splits the vocabulary too (the token embeddings and LM head, and a
// distillation teacher's alike: Transformer::set_vocab_parallel): where dist.tensor_parallel
// divides model.vocab_size.
bool vocab_parallel(const Config& cfg);
// Whether distillation's teacher is held in bf16 alone (Transformer::use_bf16_master: it is never
// updated): under train.precision bf16, but on a GPU with the vocabulary split.
bool teacher_in_bf16(const Config& cfg);

// Checks train.* values that no other component checks; throws Error naming the key.
void validate_train_config(const Config& cfg);
// Throws Error for early stopping that cannot fire (train.patience without evaluations): train's
// and plan's check (lr-find ignores the key).
void check_early_stopping(const Config& cfg);
// Throws Error when model.vocab_size has fewer rows than the tokenizer (data.tokenizer) has ids.
void check_vocab_covers(int64_t vocab_size, int64_t tokenizer_ids, const std::string& tokenizer);
// What the number of ranks launched must satisfy for the run's layout: a multiple of
// dist.tensor_parallel (the world's own, dist.backend and dist.ranks_per_node, when it is made).
void validate_rank_count(const Config& cfg, int ranks);
// The end-of-run sample's options (the stop token and vocabulary limit from `tok` when given).
SamplingOptions sampling_options(const Config& cfg, const Tokenizer* tok);
// Prints cfg.sample.prompt and the text `model` goes on with (moved to the CPU, where decoding
// runs), unless its decode buffers do not fit (a warning then).
void print_run_sample(Transformer& model, const Config& cfg, const Tokenizer& tok);
// train.inject_fault: "nan@5,spike@9" -> {5: "nan", 9: "spike"} (1-based steps); Error naming
// the key on anything else.
std::map<int64_t, std::string> parse_faults(const std::string& spec);

}  // namespace lmforge
