// Checks of a run's config before anything runs (trainer.h): the train.* keys no other component
// checks, the schedule, train.device, the end-of-run sample's options and train.inject_fault.
#include <fmt/core.h>

#include <cmath>
#include <map>
#include <sstream>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/error.h"
#include "lmforge/data/loader.h"
#include "lmforge/data/text_shards.h"
#include "lmforge/dist/communicator.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/eval/generate.h"
#include "lmforge/nn/block.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/guard.h"
#include "lmforge/train/objective.h"
#include "lmforge/train/trainer.h"

namespace lmforge {

Schedule make_schedule(const TrainConfig& t) {
  Schedule s{t.schedule,  t.lr,    t.min_lr == -1 ? t.lr / 10 : t.min_lr,
             t.warmup,    t.steps, t.decay_fraction,
             t.div_factor};
  s.validate();
  return s;
}

std::map<int64_t, std::string> parse_faults(const std::string& spec) {
  std::map<int64_t, std::string> out;
  std::stringstream ss(spec);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t at = item.find('@');
    std::string kind = item.substr(0, at);
    int64_t step = 0;
    try {
      step = at == std::string::npos ? 0 : std::stoll(item.substr(at + 1));
    } catch (...) {
    }
    if ((kind != "nan" && kind != "spike" && kind != "kill" && kind != "hang") || step <= 0)
      fail(
          "train.inject_fault: \"{}\": expected nan@STEP, spike@STEP, kill@STEP or hang@STEP, "
          "comma-separated",
          item);
    out[step] = kind;
  }
  return out;
}

namespace {
// train.optimizer and its train.muon_* keys.
void validate_optimizer(const Config& cfg) {
  const TrainConfig& t = cfg.train;
  if (t.optimizer != "adamw" && t.optimizer != "muon")
    fail("train.optimizer: expected adamw or muon, got \"{}\"", t.optimizer);
  if (t.muon_adjust_lr != "match_rms_adamw" && t.muon_adjust_lr != "original")
    fail("train.muon_adjust_lr: expected match_rms_adamw or original, got \"{}\"",
         t.muon_adjust_lr);
  if (!(t.muon_lr >= 0 && t.muon_lr < 1e6))
    fail("train.muon_lr: must be >= 0 (0 = train.lr), got {}", t.muon_lr);
  if (!(t.muon_momentum >= 0 && t.muon_momentum < 1))
    fail("train.muon_momentum: must be in [0, 1) (0.95 typical), got {}", t.muon_momentum);
  if (t.muon_ns_steps < 1 || t.muon_ns_steps >= 100)
    fail("train.muon_ns_steps: must be in [1, 100) (5 typical), got {}", t.muon_ns_steps);
  if (t.optimizer != "muon") return;
  if (cfg.dist.offload)
    fail(
        "dist.offload: not with train.optimizer muon (its step runs where the model is); set it "
        "to false");
  if (t.master_weights == "bf16")
    fail(
        "train.master_weights: muon steps fp32 matrices, not bf16 master weights; set it to fp32 "
        "(or train.optimizer: adamw)");
  if (cfg.model.lora.on())
    fail(
        "train.optimizer: muon is for whole matrices; LoRA adapters (model.lora_rank) train with "
        "adamw");
}
// dist.tensor_parallel and what it does not combine with yet.
void validate_tensor_parallel(const Config& cfg) {
  const TrainConfig& t = cfg.train;
  const int64_t tp = cfg.dist.tensor_parallel;
  if (tp < 1 || tp > 4096)
    fail("dist.tensor_parallel: expected the ranks sharing each block (1 = off), got {}", tp);
  if (tp == 1) {
    if (cfg.dist.sequence_parallel)
      fail(
          "dist.sequence_parallel: splits the rows of a tensor-parallel group; set "
          "dist.tensor_parallel to 2 or more, or sequence_parallel to false");
    return;
  }
  auto refuse = [&](const std::string& key, const std::string& fix) {
    fail("dist.tensor_parallel: {} is not supported with tensor parallelism yet; {}", key, fix);
  };
  // (distillation's teacher is split like the model: its share scores the group's rows)
  if (t.cuda_graphs) refuse("train.cuda_graphs", "set it to false");
  if (!cfg.dist.sequence_parallel) return;
  if (t.batch_size % tp != 0)
    fail(
        "train.batch_size: {} rows do not split over the {} ranks of a sequence-parallel group "
        "(each takes 1/{} of them); choose a multiple of {}",
        t.batch_size, tp, tp, tp);
  // (distillation: the teacher's share runs sequence-parallel too; preference
  // objectives: each rank its own pairs or labelled rows, their terms summed over the group)
  if (paired_objective(t.objective) && (t.batch_size / tp) % 2 != 0)
    fail(
        "train.batch_size: {} rows give each of the {} ranks of a sequence-parallel group {}, "
        "but a preference pair takes two rows of one rank; choose a multiple of {}",
        t.batch_size, tp, t.batch_size / tp, 2 * tp);
}

}  // namespace

AdamWOptions optimizer_options(const Config& cfg) {
  const TrainConfig& t = cfg.train;
  AdamWOptions o{t.beta1, t.beta2, t.eps, t.weight_decay, /*seed=*/t.seed};
  o.fp32_masters = cfg.model.lora.on();  // (only bf16 values get one: bf16 master weights)
  o.muon.on = t.optimizer == "muon";
  o.muon.momentum = t.muon_momentum;
  o.muon.nesterov = t.muon_nesterov;
  o.muon.ns_steps = static_cast<int>(t.muon_ns_steps);
  o.muon.match_rms_adamw = t.muon_adjust_lr == "match_rms_adamw";
  o.muon.lr_ratio = t.muon_lr > 0 ? t.muon_lr / t.lr : 1.0;
  // The Newton-Schulz products in bf16 (as torch's) where bf16 matmuls beat fp32 ones: a GPU, AMX
  // or Zen 4; elsewhere (AVX512-BF16 alone) fp32 is faster and exact.
  o.muon.bf16 = t.precision == "bf16" &&
                (resolve_device(t.device) == Device::kCUDA || cpu_features().fast_bf16_products);
  return o;
}

void validate_train_config(const Config& cfg) {
  const TrainConfig& t = cfg.train;
  auto positive = [](int64_t v, const char* key) {
    if (v <= 0) fail("train.{}: must be positive, got {}", key, v);
  };
  positive(t.steps, "steps");
  if (cfg.run.dir.empty()) fail("run.dir: empty; set the run directory (e.g. runs/my-run)");
  if (t.eval_every > 0) positive(t.eval_batches, "eval_batches");
  if (t.eval_every < 0) fail("train.eval_every: must be >= 0 (0 = never), got {}", t.eval_every);
  if (!(cfg.data.val_fraction >= 0 && cfg.data.val_fraction < 1))
    fail("data.val_fraction: {} must be in [0, 1)", cfg.data.val_fraction);
  check_packing(cfg.data.packing);
  if (cfg.data.tokenizer.starts_with("bpe:") && bpe_spec_size(cfg.data.tokenizer) < 257)
    fail("data.tokenizer: \"{}\": expected bpe:N with N >= 257", cfg.data.tokenizer);
  if (!cfg.sample.prompt.empty())  // the sample comes after training: its options are checked now
    check_sampling(sampling_options(cfg, nullptr), /*config_keys=*/true);
  positive(t.batch_size, "batch_size");
  positive(t.seq_len, "seq_len");
  positive(t.grad_accum, "grad_accum");
  positive(t.log_every, "log_every");
  if (t.min_lr != -1 && (!(t.min_lr >= 0) || !std::isfinite(t.min_lr)))  // -1: train.lr / 10
    fail("train.min_lr: must be >= 0, got {}", t.min_lr);
  if (!(t.beta1 >= 0 && t.beta1 < 1)) fail("train.beta1: must be in [0, 1), got {}", t.beta1);
  if (!(t.beta2 >= 0 && t.beta2 < 1)) fail("train.beta2: must be in [0, 1), got {}", t.beta2);
  if (!(t.eps > 0)) fail("train.eps: must be positive, got {}", t.eps);
  if (!(t.weight_decay >= 0)) fail("train.weight_decay: must be >= 0, got {}", t.weight_decay);
  if (!(t.grad_clip >= 0)) fail("train.grad_clip: must be >= 0 (0 = off), got {}", t.grad_clip);
  if (t.checkpoint_every < 0)
    fail("train.checkpoint_every: must be >= 0 (0 = only at the end), got {}", t.checkpoint_every);
  if (t.keep_last < 0) fail("train.keep_last: must be >= 0 (0 = all), got {}", t.keep_last);
  if (t.precision != "fp32" && t.precision != "bf16")
    fail("train.precision: expected fp32 or bf16, got \"{}\"", t.precision);
  if (t.master_weights != "fp32" && t.master_weights != "bf16")
    fail("train.master_weights: expected fp32 or bf16, got \"{}\"", t.master_weights);
  if (t.master_weights == "bf16") {
    if (t.precision != "bf16")
      fail(
          "train.master_weights: bf16 needs train.precision: bf16 (bf16 weights feed bf16 "
          "matmuls); set both, or keep master_weights: fp32");
  }
  const Device device = resolve_device(t.device);
  if (t.cuda_graphs && device != Device::kCUDA)
    fail(
        "train.cuda_graphs: CUDA graphs need a GPU, but train.device {} trains on the CPU; set "
        "train.cuda_graphs: false",
        t.device);
  if (t.cuda_graphs && dist::parse_strategy(cfg.dist.strategy) > dist::Strategy::kZero1)
    fail(
        "train.cuda_graphs: works with dist.strategy no-shard or zero1 (the sharded strategies "
        "gather and scatter between the layers); set train.cuda_graphs: false");
  make_schedule(t);  // schedule keys
  parse_recompute(t.activation_checkpointing);
  if (t.z_loss < 0) fail("train.z_loss: must be >= 0, got {}", t.z_loss);
  const bool pairs = paired_objective(t.objective);
  if (!preference_objective(t.objective) && t.objective != "clm" && t.objective != "distill")
    fail("train.objective: expected clm, dpo, orpo, simpo, kto or distill, got \"{}\"",
         t.objective);
  if (t.objective != "clm" && t.z_loss != 0)
    fail("train.z_loss: applies to train.objective clm only (not {}); set it to 0", t.objective);
  if (t.objective == "distill") {
    if (t.teacher.empty())
      fail(
          "train.teacher: train.objective distill needs a teacher; set it to a checkpoint or run "
          "directory, or hf:DIR");
    if (!(t.distill_alpha >= 0 && t.distill_alpha <= 1))
      fail("train.distill_alpha: must be in [0, 1] (the KL term's weight), got {}",
           t.distill_alpha);
    if (!(t.distill_temperature > 0 && t.distill_temperature < 1e4))
      fail("train.distill_temperature: must be positive (2 typical), got {}",
           t.distill_temperature);
  } else if (!t.teacher.empty()) {
    fail("train.teacher: only with train.objective: distill (this run's is {}); remove it",
         t.objective);
  }
  if (pairs) {
    if (t.batch_size % 2)
      fail(
          "train.batch_size: {} is odd; under train.objective {} a preference pair takes two "
          "rows (chosen, rejected), make it even",
          t.batch_size, t.objective);
  }
  if (!(t.dpo_beta > 0 && t.dpo_beta < 1e6))
    fail("train.dpo_beta: must be positive (0.1 typical), got {}", t.dpo_beta);
  if (!(t.dpo_label_smoothing >= 0 && t.dpo_label_smoothing < 0.5))
    fail("train.dpo_label_smoothing: must be in [0, 0.5), got {}", t.dpo_label_smoothing);
  if (parse_dpo_loss(t.dpo_loss) != DpoLoss::kSigmoid && t.dpo_label_smoothing != 0)
    fail(
        "train.dpo_label_smoothing: applies to train.dpo_loss sigmoid only (this run's is {}); set "
        "it to 0",
        t.dpo_loss);
  if (!(t.orpo_lambda >= 0 && t.orpo_lambda < 1e6))
    fail("train.orpo_lambda: must be >= 0 (0.1 typical), got {}", t.orpo_lambda);
  if (!(t.simpo_beta > 0 && t.simpo_beta < 1e6))
    fail("train.simpo_beta: must be positive (2 to 2.5 typical), got {}", t.simpo_beta);
  if (!(std::fabs(t.simpo_gamma) < 1e6))
    fail("train.simpo_gamma: must be a finite number (0.5 to 1.5 typical), got {}", t.simpo_gamma);
  if (!(t.simpo_label_smoothing >= 0 && t.simpo_label_smoothing < 0.5))
    fail("train.simpo_label_smoothing: must be in [0, 0.5), got {}", t.simpo_label_smoothing);
  if (t.precompute_ref_logps && t.objective != "dpo")
    fail(
        "train.precompute_ref_logps: applies to train.objective dpo only (not {}: KTO's KL rows "
        "change every step, the others have no reference model); set it to false",
        t.objective);
  validate_optimizer(cfg);
  if (t.hellaswag_limit < 0)
    fail("train.hellaswag_limit: must be >= 0 (0 = every example), got {}", t.hellaswag_limit);
  if (!t.hellaswag.empty() && t.eval_every <= 0)
    fail(
        "train.hellaswag: scored at every evaluation, but train.eval_every is {}; set it to the "
        "steps between scores",
        t.eval_every);
  parse_kto_loss(t.kto_loss);
  if (t.objective == "kto" && t.kto_loss == "kto" && t.batch_size < 2)
    fail(
        "train.batch_size: KTO estimates its KL term from each row's prompt with another row's "
        "response, which needs at least 2 rows per micro-batch; raise it");
  if (!(t.kto_beta > 0 && t.kto_beta < 1e6))
    fail("train.kto_beta: must be positive (0.1 typical), got {}", t.kto_beta);
  if (!(t.kto_desirable_weight > 0 && t.kto_desirable_weight < 1e6))
    fail("train.kto_desirable_weight: must be positive (1 typical), got {}",
         t.kto_desirable_weight);
  if (!(t.kto_undesirable_weight > 0 && t.kto_undesirable_weight < 1e6))
    fail("train.kto_undesirable_weight: must be positive (1 typical), got {}",
         t.kto_undesirable_weight);
  if (!(t.cpo_alpha >= 0 && t.cpo_alpha < 1e6))
    fail("train.cpo_alpha: must be >= 0 (0 = SimPO, 1 = CPO-SimPO), got {}", t.cpo_alpha);
  if (!(t.neftune_alpha >= 0 && t.neftune_alpha < 1e6))
    fail("train.neftune_alpha: must be >= 0 (0 = off; 5 is typical), got {}", t.neftune_alpha);
  if (t.spike_zscore < 0)
    fail("train.spike_zscore: must be >= 0 (0 = off), got {}", t.spike_zscore);
  positive(t.spike_window, "spike_window");
  if (const int64_t h = SpikeGuard::Options{}.min_history; t.spike_zscore > 0 && t.spike_window < h)
    fail(
        "train.spike_window: {} is below the {} accepted steps the spike guard needs before it "
        "z-scores a loss (it would never fire); raise it to at least {}, or set "
        "train.spike_zscore: 0",
        t.spike_window, h, h);
  if (t.max_skips < 0) fail("train.max_skips: must be >= 0, got {}", t.max_skips);
  if (t.patience < 0) fail("train.patience: must be >= 0 (0 = off), got {}", t.patience);
  if (t.profile_steps < 0)
    fail("train.profile_steps: must be >= 0 (0 = off), got {}", t.profile_steps);
  parse_faults(t.inject_fault);
  dist::parse_strategy(cfg.dist.strategy);
  dist::check_backend(cfg.dist.backend);
  if (!(cfg.dist.bucket_mb > 0))  // NaN too
    fail("dist.bucket_mb: must be positive, got {}", cfg.dist.bucket_mb);
  if (!(cfg.dist.timeout > 0 && cfg.dist.timeout <= 1e7))  // NaN and inf too (deadlines)
    fail("dist.timeout: must be seconds in (0, 1e7], got {}", cfg.dist.timeout);
  if (cfg.dist.ranks_per_node < 0)
    fail("dist.ranks_per_node: must be >= 0 (0 = as launched), got {}", cfg.dist.ranks_per_node);
  validate_tensor_parallel(cfg);
}

void check_early_stopping(const Config& cfg) {
  const TrainConfig& t = cfg.train;
  // Early stopping counts validation losses (Lightning's EarlyStopping raises when its metric is
  // missing): never evaluated, it would never fire.
  if (t.patience > 0 && t.eval_every <= 0)
    fail(
        "train.patience: early stopping counts validation losses, but train.eval_every is {} "
        "(never evaluated); set it to the steps between evaluations, or train.patience: 0",
        t.eval_every);
}

void check_vocab_covers(int64_t vocab_size, int64_t tokenizer_ids, const std::string& tokenizer) {
  if (vocab_size < tokenizer_ids)
    fail(
        "model.vocab_size: {} is smaller than the tokenizer's {} ids ({}); set it to 0 to take "
        "the tokenizer's",
        vocab_size, tokenizer_ids, tokenizer);
}

void validate_rank_count(const Config& cfg, int ranks) {
  const int64_t tp = cfg.dist.tensor_parallel;
  if (ranks % tp != 0)
    fail(
        "dist.tensor_parallel: {} does not divide the {} ranks launched; launch a multiple of {} "
        "ranks",
        tp, ranks, tp);
}

bool vocab_parallel(const Config& cfg) {
  const int64_t tp = cfg.dist.tensor_parallel;
  return tp > 1 && cfg.model.vocab_size > 0 && cfg.model.vocab_size % tp == 0;
}

bool teacher_in_bf16(const Config& cfg) {
  // (on a GPU, bf16 embedding tables split by the vocabulary cannot run yet: see setup_run)
  const std::string& d = cfg.train.device;
  const bool gpu = d == "cuda" || (d == "auto" && cuda::available());
  return cfg.train.objective == "distill" && cfg.train.precision == "bf16" &&
         !(vocab_parallel(cfg) && gpu);
}

Device resolve_device(const std::string& device) {
  if (device == "cpu") return Device::kCPU;
  if (device == "auto") {
    if (cuda::available()) return Device::kCUDA;
    // A GPU the runtime cannot use (driver too old, taken in exclusive mode) is worth a word
    // before training on the CPU instead.
    static bool warned = false;
    if (!warned && !cuda::no_device()) {
      warned = true;
      fmt::print(stderr, "warning: train.device: auto trains on the CPU: {}\n",
                 cuda::unavailable_reason());
    }
    return Device::kCPU;
  }
  if (device != "cuda") fail("train.device: expected cpu, cuda or auto, got \"{}\"", device);
  if (!cuda::available())
    fail("train.device: cuda, but {}; use cpu, or auto to take a GPU only when there is one",
         cuda::unavailable_reason());
  return Device::kCUDA;
}

}  // namespace lmforge
