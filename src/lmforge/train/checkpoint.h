// Checkpoints: one directory per save, <run.dir>/checkpoints/step-00000100/, holding
//   model.safetensors      parameters by name (fp32)
//   optimizer.safetensors  AdamW moments as "m.<name>" / "v.<name>" (absent in a weights-only
//                          checkpoint, e.g. from `lmforge convert`)
//   state.json             format, version, step, model config, loader RNG, optimizer step count
//   config.yaml            the resolved run config
//   tokenizer/             the tokenizer's files (absent for the byte-level tokenizer)
// The directory is written as step-N.tmp/ and renamed when complete, so a crash never leaves a
// checkpoint that looks valid. Layout and fields: docs/formats.md.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "lmforge/core/rng.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

struct TrainState {
  int64_t step = 0;       // optimizer steps completed
  nlohmann::json loader;  // Loader::state(): RNG, per-source epoch and cursor
  std::string init_from;  // where the initial weights came from ("" = random init)
};

// Returns the checkpoint directory. Removes older checkpoints beyond keep_last (0 = keep all).
// opt == nullptr writes a weights-only checkpoint (no optimizer.safetensors).
std::string save_checkpoint(const std::string& run_dir, const Transformer& model, const AdamW* opt,
                            const TrainState& st, const std::string& config_yaml, int64_t keep_last,
                            const Tokenizer& tok);
// Newest complete checkpoint under run_dir/checkpoints, or "" if none.
std::string find_latest_checkpoint(const std::string& run_dir);
// PATH may be a checkpoint directory or a run directory (its newest checkpoint).
std::string resolve_checkpoint(const std::string& path);
ModelConfig checkpoint_model_config(const std::string& ckpt_dir);
// Throws Error naming the first model key that differs from the checkpoint's.
void check_same_architecture(const std::string& ckpt_dir, const ModelConfig& cfg);
// The checkpoint's tokenizer (its tokenizer/ directory, else the byte-level one).
std::unique_ptr<Tokenizer> checkpoint_tokenizer(const std::string& ckpt_dir);
// The checkpoint's recorded init_from ("" when trained from random weights).
std::string checkpoint_init_from(const std::string& ckpt_dir);
// Loads parameters (and, when opt/st are given, optimizer state and train state; a weights-only
// checkpoint then fails with a message pointing at init_from).
void load_checkpoint(const std::string& ckpt_dir, Transformer& model, AdamW* opt, TrainState* st);

}  // namespace lmforge
