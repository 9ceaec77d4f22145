// Checkpoints: one directory per save, <run.dir>/checkpoints/step-00000100/, holding
//   model.safetensors      parameters by name (fp32)
//   optimizer.safetensors  AdamW moments as "m.<name>" / "v.<name>" (absent in a weights-only
//                          checkpoint, e.g. from `lmforge convert`)
//   state.json             format, version, step, model config, loader RNG, optimizer step count,
//                          the validation loss measured at this step
//   config.yaml            the resolved run config
//   tokenizer/             the tokenizer's files (absent for the byte-level tokenizer)
//   manifest.json          every file above with its size and SHA-256, written last
// A save survives kill -9 and power loss at any moment: it writes step-N.tmp/, fsyncs every file,
// writes and fsyncs manifest.json, renames the directory to step-N and fsyncs checkpoints/. So a
// checkpoint is complete iff its name has no .tmp suffix and manifest.json exists; readers also
// check every file against the manifest (verify_checkpoint) and fall back to an older checkpoint
// when the newest is damaged. Layout, fields and retention: docs/formats.md.
//
//   save_checkpoint(run_dir, model, &opt, st, config_yaml, keep_last, tok);
//   std::string dir = find_latest_checkpoint(run_dir);  // newest that verifies, or ""
//   load_checkpoint(dir, model, &opt, &st);
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>

#include "lmforge/core/rng.h"
#include "lmforge/dist/communicator.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

struct TrainState {
  int64_t step = 0;                // optimizer steps completed
  nlohmann::json loader;           // Loader::state(): RNG, per-source epoch and cursor
  std::string init_from;           // where the initial weights came from ("" = random init)
  std::optional<double> val_loss;  // validation loss measured at this step, if there was one
  nlohmann::json guard;            // SpikeGuard::state() (null = fresh)
  nlohmann::json evals;  // validation history for best/early stopping: best, best_step, bad
  int64_t tokens = -1;   // tokens trained on so far, over every rank (-1: not recorded)
  double elapsed_s = 0;  // training time so far, over every resume
};

// Sharded training (dist/data_parallel.h): every rank calls save_checkpoint; the writers each
// write their pieces as model-rank-R-of-N.safetensors (when the values are sharded) and
// optimizer-rank-R-of-N.safetensors (when AdamW's slots are pieces), holding 1-D slices named
// like the whole tensors with "begin.<name>" metadata (the slice's first element); rank 0 writes
// the rest and the manifest and renames the directory. A checkpoint loads with any number of
// ranks: each reads the pieces overlapping what it holds.
struct CheckpointShards {
  dist::Communicator* comm = nullptr;  // every rank of the job
  int index = 0, count = 1;            // this rank's shard, shards in all
  bool writes = true;                  // false on replicas (hybrid: only the first node writes)
  bool optimizer_sharded = false;      // AdamW holds pieces (zero1 and up)
  const Tensor* values = nullptr;      // the value shard when the model holds no values
  int64_t values_lo = 0;               // its first flat element (ParamSet::offset)
  // Tensor parallelism: `model` is a layout of the whole model (MeasureOnly) and each of its
  // tensors is made whole by this collective (TensorParallel::gather_param): p's values (what
  // 0) or AdamW's moments and fp32 masters (1, 2, 3), on rank 0, undefined elsewhere. Every rank
  // calls it in the same order (the values, then each trained parameter's m, v and master) while
  // rank 0 streams them
  // into model.safetensors and optimizer.safetensors, holding one parameter at a time; `opt`
  // (the share's) gives the step count and the optimizer's name.
  std::function<Tensor(const Param& p, int what)> whole_param;
  DType values_dtype = DType::kF32;  // the values' dtype in the file (bf16 masters: bf16)
};

// Writes <run_dir>/checkpoints/step-<st.step>/ (see above) and returns its path. Then: removes
// stale step-*.tmp directories left by an interrupted save, and prune_checkpoints(st.step).
// opt == nullptr writes a weights-only checkpoint (no optimizer.safetensors).
// Moves the checkpoints past `step` aside into checkpoints/abandoned/ (a continuation abandoned by
// resuming an earlier checkpoint: --resume never takes them, nothing trained is deleted); keeps
// the newest keep_last (0 = all) plus the one with the lowest val_loss, named in
// checkpoints/best. After each save, and when a resume starts.
void prune_checkpoints(const std::string& run_dir, int64_t step, int64_t keep_last);
std::string save_checkpoint(const std::string& run_dir, const Transformer& model, const AdamW* opt,
                            const TrainState& st, const std::string& config_yaml, int64_t keep_last,
                            const Tokenizer& tok, const CheckpointShards* shards = nullptr);
// Checks every file of a checkpoint against its manifest.json: present, the listed size, the
// listed SHA-256 (reads every byte: ~0.5 s per GB with the CPU's SHA extensions, ~3 s without,
// files in parallel). Returns "" when all match, else the path of the first file that does not
// (manifest.json itself when it is missing or unreadable), and in *why what is wrong, e.g.
// "100 bytes, manifest.json says 4096".
std::string verify_checkpoint(const std::string& ckpt_dir, std::string* why = nullptr);
// Whether run_dir/checkpoints holds a complete checkpoint (not verified).
bool has_checkpoints(const std::string& run_dir);
// Newest complete checkpoint under run_dir/checkpoints that verifies, or "" if there is none.
// Each newer one that fails verification is skipped with one warning line on stderr naming the
// file; when some exist but none verifies, throws Error naming the newest one's bad file.
std::string find_latest_checkpoint(const std::string& run_dir);
// PATH may be a checkpoint directory (verified; Error naming the bad file) or a run directory
// (its newest valid checkpoint).
// Both hold the checkpoint they return for reading until release_checkpoint_reads() or the
// process ends: a trainer's prune (train.keep_last) leaves it for a later one meanwhile (generate,
// eval, export, info on a run that trains). A checkpoint pruned between the listing and the hold
// is no damage: the listing is taken again.
std::string resolve_checkpoint(const std::string& path);
void release_checkpoint_reads();
ModelConfig checkpoint_model_config(const std::string& ckpt_dir);
// Throws Error naming the first model key that differs from the checkpoint's.
void check_same_architecture(const std::string& ckpt_dir, const ModelConfig& cfg);
// Throws Error when the checkpoint was trained with another tokenizer than `tok` (its fingerprint
// in state.json; the same vocabulary size would otherwise resume silently with other ids).
void check_same_tokenizer(const std::string& ckpt_dir, const Tokenizer& tok);
// The checkpoint's tokenizer (its tokenizer/ directory, else the byte-level one).
std::unique_ptr<Tokenizer> checkpoint_tokenizer(const std::string& ckpt_dir);
// The checkpoint's recorded init_from ("" when trained from random weights).
std::string checkpoint_init_from(const std::string& ckpt_dir);
// The safetensors dtypes its model values are stored in ("F32"; "BF16" under bf16 master weights).
std::set<std::string> checkpoint_dtypes(const std::string& ckpt_dir);
// The values of the flat parameter elements [lo, lo + out.numel()) (ParamSet::offset) from
// model.safetensors or the model-rank files, whichever the checkpoint has. With `share`, ps is
// the layout of a part of the checkpoint's model (a tensor-parallel share,
// dist::tensor_parallel_share_of) and only that part is read. `resuming` (with the optimizer
// state): fp32 values take the fp32 masters of bf16 ones the optimizer files hold (LoRA's adapters
// under bf16 master weights) instead of the rounded values.
void load_checkpoint_values(const std::string& ckpt_dir, const ParamSet& ps, int64_t lo,
                            const Tensor& out, const ShareOfWhole& share = {},
                            bool resuming = false);
// The same values one parameter at a time: give(p, values) for every parameter of `layout` (a
// model of the checkpoint's architecture, MeasureOnly will do; LoRA adapters a checkpoint without
// them lacks are left out), each whole in fp32.
void for_each_checkpoint_value(const std::string& ckpt_dir, const ParamSet& layout,
                               const GiveValues& give);
// Loads parameters (unless the model's values are released for full-shard), and when given,
// optimizer state (opt: its slots' elements alone) and train state (st); a weights-only
// checkpoint then fails with a message pointing at init_from. With `share`, the model is a share
// of the checkpoint's (see load_checkpoint_values). Does not verify: get ckpt_dir from
// find_latest_checkpoint / resolve_checkpoint.
void load_checkpoint(const std::string& ckpt_dir, Transformer& model, AdamW* opt, TrainState* st,
                     const ShareOfWhole& share = {});

}  // namespace lmforge
