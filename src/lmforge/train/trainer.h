// The training loop for causal-LM pretraining:
//   for each step: lr = schedule(step); zero grads; grad_accum x (next batch, forward, backward);
//   clip to train.grad_clip; AdamW step; log; every eval_every: validation loss; every
//   checkpoint_every (and at the end): checkpoint.
// The run directory holds config.yaml (resolved), metrics.jsonl and checkpoints/.
//
//   Config cfg = ...;  TrainResult r = train(cfg, /*resume=*/"");   // or "auto" or a path
#pragma once

#include <string>

#include "lmforge/io/config.h"

namespace lmforge {

struct TrainResult {
  int64_t steps = 0;
  double first_loss = 0, last_loss = 0, last_val_loss = -1;
  std::string last_checkpoint;
};

// resume: "" = fresh run (run.dir must not already hold checkpoints), "auto" = newest
// checkpoint in run.dir, else a checkpoint directory.
TrainResult train(Config& cfg, const std::string& resume);

// Checks train.* values that no other component checks; throws Error naming the key.
void validate_train_config(const Config& cfg);

}  // namespace lmforge
