// The training loop for causal-LM pretraining:
//   for each step: lr = schedule(step); zero grads; grad_accum x (next batch, forward, backward);
//   clip to train.grad_clip; AdamW step; log; every eval_every: validation loss; every
//   checkpoint_every (and at the end): checkpoint.
// The run directory holds config.yaml (resolved), metrics.jsonl and checkpoints/.
//
//   Config cfg = ...;  TrainResult r = train(cfg);   // or train(cfg, {.from = "auto"})
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "lmforge/data/loader.h"
#include "lmforge/io/config.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/schedule.h"

namespace lmforge {

struct TrainResult {
  int64_t steps = 0;
  double first_loss = 0, last_loss = 0, last_val_loss = -1;
  std::string last_checkpoint;
  bool stopped_early = false;
};

// One optimizer step's gradients over micro-batches, normalized by the number of target tokens
// of all of them (not by the number of micro-batches): each micro-batch's mean-loss gradient is
// weighted by its share of the targets, so the sum is the full batch's gradient however ignored
// (padding) targets fall. Returns the token-weighted mean loss; gradients +=.
double accumulate_gradients(Transformer& model, const std::vector<Batch>& micro,
                            double* mean_lse_sq = nullptr);

// The learning-rate schedule train.* describes (validated; throws Error naming the key).
Schedule make_schedule(const TrainConfig& t);

// Validation losses so far: the best (lower by more than min_delta than the previous best) and
// how many evaluations since it (early stopping's count). Saved in checkpoints.
class EvalHistory {
 public:
  explicit EvalHistory(const nlohmann::json& state = nullptr);
  bool add(int64_t step, double val_loss, double min_delta);  // true if this is the new best
  double best() const { return best_; }
  int64_t best_step() const { return best_step_; }
  int64_t bad() const { return bad_; }
  nlohmann::json state() const;

 private:
  double best_ = 0;
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

// Checks train.* values that no other component checks; throws Error naming the key.
void validate_train_config(const Config& cfg);

}  // namespace lmforge
