// Transformer: the whole decoder-only model for GPT-2 and Llama configurations.
//
//   Transformer model(model_preset("gpt2-tiny"));
//   model.init_weights(1337);
//   model.plan(B, T);                          // activations for this (B, T), allocated once
//   model.params().zero_grad();
//   float loss = model.forward_backward(tokens, targets);  // (B, T) int32; parameter grads +=
//   float val = model.forward(tokens, targets);            // no gradients (evaluation)
//
// Packed rows (data.packing: best_fit puts several documents in a row) pass the loader's doc_ids
// (B, T) as well: each document then attends only to itself and its positions start at 0, as
// if it were alone in its row (docs/formats.md, "packing").
//
// Generation uses decode() with a KvCache (see eval/generate.h).
#pragma once

#include <cmath>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "lmforge/nn/block.h"

namespace lmforge {

struct KvCache {
  int64_t max_len = 0;
  std::vector<Tensor> k, v;  // per layer (NKV, max_len, HS): fp32, or bf16 for bf16 weights
};

// n tokens of one sequence at positions pos0.. for Transformer::decode, its keys and values kept
// in cache.
struct DecodeSegment {
  KvCache* cache;
  const int32_t* tokens;
  int64_t n, pos0;
};

// Data parallelism's seam (dist/data_parallel.h). The parameters fall into groups that tile
// ParamSet's flat space in order: 0 the embeddings, 1..L the blocks, L+1 the final norm (and an
// untied LM head). Forward passes (training and evaluation) call before_forward(g) before group
// g's parameters are first read; training calls before_backward(g) before a block's backward and
// grads_ready(g) once group g's gradients of the micro-batch are final (L+1, L, ..., 1, 0).
class GroupHooks {
 public:
  virtual ~GroupHooks() = default;
  virtual void before_forward(int64_t group) {}
  virtual void before_backward(int64_t group) {}
  virtual void grads_ready(int64_t group) {}
  // Whether a training step may be captured as a CUDA graph (Transformer::set_cuda_graphs): the
  // hooks run while the step is captured, not when it is replayed, so they must do no work a
  // step needs (true for one process without sharded gradients or values).
  virtual bool graph_safe() const { return true; }
};

// LoRA adapters' parameters ("<layer>.lora_a", "<layer>.lora_b"; nn/linear.h).
bool is_lora_param(const std::string& name);

class Transformer {
 public:
  explicit Transformer(const ModelConfig& cfg);
  // A model that allocates nothing (lmforge plan's): its parameters' layout, and plan() only
  // measures the activations it would take (activation_bytes()) as if bf16 were enabled when
  // `bf16`, and as on a GPU when `gpu` (its larger LM-head chunks and padded rows; cuDNN assumed
  // to take the bf16 attention where its head size allows); it cannot run.
  struct MeasureOnly {
    bool bf16 = false, gpu = false;
  };
  Transformer(const ModelConfig& cfg, MeasureOnly m) : Transformer(cfg, std::optional(m)) {}

  const ModelConfig& config() const { return cfg_; }
  ParamSet& params() { return params_; }
  const ParamSet& params() const { return params_; }

  // GPT-2 initialisation: N(0, init_std) for matrices and embeddings, N(0, init_std/sqrt(2L)) for
  // the projections into the residual stream, zeros for biases, norms scaling by one (weights 1,
  // or 0 under norm_offset 1).
  void init_weights(uint64_t seed);
  // LoRA: with adapters off, forwards compute the base model alone (PEFT's disable_adapter();
  // DPO's reference under LoRA). Training needs them on.
  void set_adapters(bool on) {
    for (Block& b : blocks_)
      for (Linear* l : {&b.qkv, &b.proj, &b.fc, &b.down}) l->lora_off = !on;
    adapters_off_ = !on;
  }
  bool adapters_off() const { return adapters_off_; }
  // The LoRA adapters alone, with the values init_weights(seed) gives them (the other weights
  // come from elsewhere: init_from).
  void init_adapters(uint64_t seed);
  // The values init_weights(seed) gives, one parameter at a time, in order (the adapters'
  // alone: init_adapters'); a MeasureOnly model gives them too. For parts of a model made
  // without the whole (a full-shard rank's shard, a tensor-parallel share).
  void for_each_init_param(uint64_t seed, const GiveValues& fn) const;
  void for_each_adapter_init(uint64_t seed, const GiveValues& fn) const;

  // Parameter groups (see GroupHooks): params()[group_begin(g), group_begin(g + 1)).
  int64_t num_groups() const { return cfg_.n_layer + 2; }
  size_t group_begin(int64_t g) const { return group_begin_[g]; }
  void set_hooks(GroupHooks* hooks) {
    hooks_ = hooks;
    graph_ = {};
  }

  // Tensor parallelism (dist/tensor_parallel.h): this model is one rank's share of a larger one
  // (its config's heads and MLP width are the share's); every block's partial sums go through
  // `sums`, and the ranks other than `adds_bias` leave the row-parallel layers' biases to it.
  // With sequence parallelism (sums->row_shards() > 1) a planned model is planned again (its
  // attention and MLP activations are the group's rows). Not with CUDA graphs.
  void set_partial_sums(const PartialSums* sums, bool adds_bias);
  bool tensor_parallel() const { return !blocks_.empty() && blocks_[0].partial; }
  // Vocabulary parallelism (with tensor parallelism): this share's token embeddings and LM
  // head (config().vocab_size rows) are ids [begin, begin + vocab_size) of a vocabulary of `total`
  // split over `ranks` ranks. The embeddings' rows are summed over them through `sums` (a token's
  // row is one rank's; the positions added by the rank with adds_positions), the loss combines
  // every rank's statistics of its columns (ops::softmax_xent_parallel), and the LM head's input
  // gradient is summed like a row-parallel layer's. Under sequence parallelism (sums->row_shards()
  // > 1) each rank embeds and scores the group's rows (their tokens, targets and final norm's
  // outputs gathered) and keeps its own: the embeddings and the head's input gradient are
  // reduce-scattered, the embeddings' gradient takes the group's output gradients (gathered).
  // Not with distillation or forwards without targets.
  void set_vocab_parallel(const PartialSums* sums, int64_t begin, int64_t total, int64_t ranks,
                          bool adds_positions);
  bool vocab_parallel() const { return vocab_ranks_ > 1; }
  // Sequence parallelism's group size (its blocks' attention and MLP rows per own row), or 1.
  int64_t row_shards() const { return blocks_.empty() ? 1 : blocks_[0].row_shards(); }

  // bf16 mixed precision (train.precision: bf16): the matmuls read bf16 copies of the weights
  // and round their inputs to bf16, accumulating in fp32; parameters, gradients, optimizer state
  // and every other op stay fp32. Call before training; the copies follow the weights.
  void enable_bf16() {
    params_.enable_bf16();
    graph_ = {};  // new buffers, not freed ones
  }
  bool bf16() const { return params_.has_bf16(); }
  // Under bf16, plan() makes the activations that only feed matmuls bf16 (Block::
  // matmul_input_dtype): same results, less memory and no conversion passes. Off keeps them fp32
  // (for comparison).
  void set_bf16_activations(bool on) { bf16_acts_ = on; }
  // With them, the matmul outputs in bf16 as well (Block::matmul_output_dtype; torch.autocast's
  // and llm.c's activations): on by default; off keeps them fp32 (the exact fp32-activation
  // results, for comparison).
  void set_bf16_matmul_outputs(bool on) { bf16_outs_ = on; }
  // Whether batches may hold packed rows (data.packing: best_fit): under sequence parallelism the
  // group's position ids and document starts are then gathered every forward (every rank's rows
  // must agree on it; without it none are).
  void set_packed_rows(bool on) { packed_rows_ = on; }
  // With bf16 matmul outputs, attention's gradients d(att) and d(qkv) in bf16 as well: what cuDNN
  // reads and writes, so on by default on a GPU where cuDNN takes the shape, where it saves the
  // conversion passes around cuDNN's backward and the rounding is cuDNN's anyway (a shape cuDNN
  // refuses, e.g. a sliding window, keeps fp32 gradients for the fp32 kernel). Off by default on
  // the CPU, whose fp32 attention backward is more precise than that (in a 40-step gpt2-tiny run
  // bf16 gradients learned ~2% slower, Bf16.Gpt2TinyTrainsLikeFp32); on for tests of the GPU's
  // path.
  void set_bf16_attention_grads(bool on) { bf16_att_grads_ = on ? 1 : 0; }
  // train.cuda_graphs: on a GPU, forward_backward() captures its kernels (forward, loss, backward)
  // into a CUDA graph once and replays it on later calls, one launch instead of ~30 per layer:
  // bit-identical results, less host time per step. Inputs are copied in and the loss is read
  // back outside the graph; a call with a different loss scale (a different count of targets)
  // runs without it. Only where the hooks allow it (GroupHooks::graph_safe: one process, no
  // sharding) and not while profiling (core/profile.h times ops one by one).
  void set_cuda_graphs(bool on) {
    cuda_graphs_ = on;
    graph_ = {};
  }
  // Micro-batches run through a graph (captured or replayed), and captures made.
  int64_t graph_launches() const { return graph_.launches; }
  int64_t graph_captures() const { return graph_.captures; }
  // train.master_weights: bf16 (after enable_bf16): the weights themselves in bf16, updated with
  // stochastic rounding (ParamSet::use_bf16_master; convert = false: values not written yet).
  void use_bf16_master(bool convert = true) {
    params_.use_bf16_master(convert);
    graph_ = {};
  }

  // Where parameters and activations live (train.device). to() moves the parameters (set-up
  // code) and drops the activation plan: plan() again after it. A CUDA model trains and evaluates
  // through the CUDA ops, and goes back to the CPU for decode(). Tokens and targets are passed as
  // host tensors either way.
  void to(Device device);
  Device device() const { return params_.device(); }

  // Activations for (B, T), allocated once; `recompute` trades memory for a second forward per
  // block in backward (activation checkpointing, nn/block.h), with bit-identical results. The
  // LM head and the loss run in chunks of rows (logits_chunk_rows()), never holding B x T x V
  // logits; keep_logits plans the full logits too, for forward() without targets (inference,
  // reference tests).
  void plan(int64_t B, int64_t T, Recompute recompute = Recompute::kNone, bool keep_logits = false);
  // A model that only runs forwards (DPO's separate reference, a distillation teacher): planned
  // as full recomputation plans its forward (each block keeps its input alone; the same results,
  // bit for bit) without the backward's buffers, and its gradient buffer freed. It cannot train
  // afterwards: every parameter is frozen (DataParallel then shards its values alone).
  void plan_forward_only(int64_t B, int64_t T) {
    forward_only_ = true;
    for (Param& p : params_.params()) p.frozen = true;
    params_.release_grads();
    plan(B, T, Recompute::kFull);
  }
  int64_t planned_batch() const { return B_; }
  int64_t planned_seq() const { return T_; }
  size_t activation_bytes() const { return measure_ ? measured_acts_ : acts_.capacity(); }
  int64_t logits_chunk_rows() const { return chunk_rows_; }
  // What B x T x V fp32 logits would take, and what the chunked LM head takes instead.
  size_t full_logits_bytes() const { return static_cast<size_t>(B_ * T_) * cfg_.vocab_size * 4; }
  size_t chunk_logits_bytes() const {  // padded rows on a GPU (see plan)
    return chunk_.defined() ? chunk_.nbytes()
                            : static_cast<size_t>(chunk_rows_) * cfg_.vocab_size * 4;
  }

  // Returns the mean cross-entropy over targets != ignore_index; no gradients. Without targets
  // (needs plan(..., keep_logits)) it only computes logits() and returns 0. doc_ids (B, T) int32
  // on the host, optional: the document of each token of a packed row, counted from 0 along the
  // row (-1: padding); a run of equal ids is one document.
  float forward(const Tensor& tokens, const Tensor& targets, int32_t ignore_index = -100,
                const Tensor& doc_ids = {});
  // A training micro-batch: returns the mean loss as forward() and accumulates into
  // params().grad the gradients of loss_scale * (mean loss + z_loss * mean lse^2). The LM head's
  // backward is fused into its chunked forward (logits -> loss -> dlogits -> dx, dW per chunk).
  // Gradient accumulation normalized by tokens passes loss_scale = (this micro-batch's targets)
  // / (all micro-batches' targets).
  float forward_backward(const Tensor& tokens, const Tensor& targets, double loss_scale = 1.0,
                         int32_t ignore_index = -100, const Tensor& doc_ids = {});
  // Per-sequence objectives (DPO, ORPO: train/objective.h). row_logps: after a forward, each
  // row's log-likelihood of its targets (the sum over them of log p(target); 0 without any).
  void row_logps(std::vector<double>& logp) const;
  const std::vector<int64_t>& row_targets() const { return row_targets_; }  // per row
  // weigh(logp, w) sets each row's gradient weight from the rows' log-likelihoods: w[r] = -d
  // loss / d logp[r], the gradient of the loss with respect to each target's cross-entropy in
  // row r.
  using RowWeigher = std::function<void(const std::vector<double>& logp, std::vector<float>& w)>;
  // A training micro-batch for such a loss: the forward, the LM head once without gradients (the
  // log-likelihoods, for weigh), then again with the rows' weights, and the backward:
  // params().grad += d loss / d params. Not captured in a CUDA graph; no z-loss.
  void forward_backward_rows(const Tensor& tokens, const Tensor& targets, const RowWeigher& weigh,
                             int32_t ignore_index = -100, const Tensor& doc_ids = {});
  // Knowledge distillation (train.objective: distill): training forwards (forward_backward) run
  // the teacher's trunk on the same tokens, and each LM-head chunk's loss per target becomes
  // (1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) || softmax(student / T)) with the teacher's
  // logits of those rows (ops::softmax_distill_forward_backward; with the vocabulary split, each
  // rank's columns of both models' logits and their statistics gathered over the group:
  // ops::softmax_distill_parallel). Evaluation stays plain cross-entropy. The teacher: same
  // vocabulary (split alike), planned for the same (B, T). Not captured in CUDA graphs; no
  // z-loss. teacher null = off.
  struct Distillation {
    Transformer* teacher = nullptr;
    double alpha = 0.5, temperature = 2.0;
  };
  void set_distillation(const Distillation& d) {
    distill_ = d;
    graph_ = {};
  }
  double mean_kl() const { return mean_kl_; }  // the last training forward's, over its targets
  // For a teacher: the trunk (embeddings, blocks, final norm) over tokens (B, T), then the LM
  // head's logits of its rows [r0, r0 + R), R at most a chunk's rows: (R, V) fp32 in its own
  // chunk buffer (rows padded on a GPU), valid until the next call. With a share of the vocabulary
  // (tensor parallelism: the student's split alike) the logits of this rank's columns, and under
  // sequence parallelism of the group's rows (rank k's k-th block of B T), as the student's head
  // scores them.
  void forward_hidden(const Tensor& tokens, const Tensor& doc_ids = {});
  Tensor head_logits(int64_t r0, int64_t R);
  // Targets != ignore_index in the last forward; mean logsumexp^2 over them (the z-loss term).
  int64_t target_count() const { return target_count_; }
  double mean_lse_sq() const { return mean_lse_sq_; }
  void set_z_loss(double z) {  // PaLM's auxiliary loss coefficient; 0 = off
    z_loss_ = z;
    graph_ = {};
  }
  // NEFTune (Jain et al. 2023, as Hugging Face's trainer): training forwards add uniform noise in
  // [-alpha / sqrt(T C), +alpha / sqrt(T C)] to the embeddings; evaluation adds none. The noise
  // of the k-th training micro-batch after this call is drawn from (key, k) on the host. alpha 0
  // = off (the default).
  void set_neftune(double alpha, uint64_t key) {
    neftune_alpha_ = alpha;
    neftune_key_ = key;
    neftune_calls_ = 0;
  }
  // LoRA's dropout (LoraConfig::dropout): the masks of the k-th training forward after this call
  // derive from (key, k), so a resumed run that sets the same key draws the same.
  void set_lora_dropout_key(uint64_t key) {
    lora_drop_key_ = key;
    lora_drop_calls_ = 0;
  }
  const Tensor& logits() const { return logits_; }  // (B, T, V) after forward, if kept
  const Tensor& embeddings() const { return x0_; }  // (B, T, C): the last forward's block input

  // Under bf16 (weights in bf16: generate --precision bf16) the cache holds bf16 keys and values,
  // half the memory traffic of decoding at long contexts; the attention still computes in fp32.
  KvCache make_cache(int64_t max_len) const;
  // Runs n tokens at positions pos0.. through the model with the cache; returns the logits of
  // the last one (V). The cache must hold pos0 + n positions.
  Tensor decode(KvCache& cache, const int32_t* tokens, int64_t n, int64_t pos0);
  // Several sequences at once, each segment as the call above with its own cache (a batch's
  // decoding step: one token each; a prompt may run beside them): their matmuls are one.
  // Returns each segment's last token's logits (segments, V).
  Tensor decode(std::span<const DecodeSegment> segments);

 private:
  ModelConfig cfg_;
  ParamSet params_;
  std::vector<size_t> group_begin_;  // num_groups() + 1 entries
  GroupHooks* hooks_ = nullptr;
  GroupHooks no_hooks_;
  GroupHooks& hooks() { return hooks_ ? *hooks_ : no_hooks_; }
  template <typename Fn>
  void for_init_values(uint64_t seed, Fn&& fn) const;
  Param* tok_emb_ = nullptr;
  Param* pos_emb_ = nullptr;
  Param* lm_head_ = nullptr;  // == tok_emb_ when tied
  std::vector<Block> blocks_;
  Norm norm_f_;
  Positions positions_;  // RoPE's tables; ids and doc_start while the batch is packed

  // training activations
  int64_t B_ = 0, T_ = 0;
  Arena acts_;
  std::vector<Block::Acts> block_acts_;
  Block::Acts shared_acts_;  // what activation checkpointing recomputes, for all blocks
  Recompute recompute_ = Recompute::kNone;
  Tensor x0_, nf_out_, logits_, chunk_, dlogits16_, losses_, dres_, dnf_;
  Tensor dcap_;  // a chunk's fp32 dlogits before the final-logit soft-capping's backward
  Transformer(const ModelConfig& cfg, std::optional<MeasureOnly> measure);
  std::optional<MeasureOnly> measure_;  // a model that only measures (MeasureOnly)
  size_t measured_acts_ = 0;
  bool bf16_acts_ = true;
  bool bf16_outs_ = true;
  int bf16_att_grads_ = -1;  // -1: on a GPU, where cuDNN's attention takes the shape
  bool cudnn_attention_for(int64_t B, int64_t T) const;
  Tensor lse_sums_;  // (chunks) fp64: each LM-head chunk's sum of logsumexp^2 (z-loss)
  // Vocabulary parallelism (set_vocab_parallel): a chunk's loss statistics (chunk_rows_, 3), and
  // every rank's (ranks, chunk_rows_, 3), fp64.
  const PartialSums* vocab_sums_ = nullptr;
  int64_t vocab_begin_ = 0, vocab_total_ = 0, vocab_ranks_ = 1;
  bool adds_positions_ = true;
  Tensor stats_, all_stats_;
  // ... under sequence parallelism, the group's rows (all ranks' own, in rank order): tokens,
  // targets, embeddings (in backward their output gradients), the final norm's outputs and their
  // gradient; the losses and lse^2 sums of the other ranks' rows.
  Tensor group_tokens_, group_targets_, group_x0_, group_nf_, group_dnf_, other_losses_, other_lse_;
  // ... and the loss's gradient scale of this rank's rows (1) and of every rank's (ranks), fp64:
  // each block of the group's rows takes its own rank's.
  Tensor scale_, group_scale_;
  // The LM head and loss under vocabulary parallelism (see queue_head).
  void queue_head_vocab(bool training, double dloss, Tensor row_scale);
  int64_t chunk_rows_ = 0;
  bool keep_logits_ = false;
  bool forward_only_ = false;  // plan_forward_only
  // A forward in three parts, so that a training step's kernels can be captured as one graph:
  // stage() copies tokens and targets in, counts the targets and returns the loss's gradient
  // scale (0 without loss_scale); queue_forward() queues the kernels (training: with the LM
  // head's backward); read_loss() waits and reads the loss and lse^2 back.
  double stage(const Tensor& tokens, const Tensor& targets, int32_t ignore_index,
               const double* loss_scale, const Tensor& doc_ids);
  // Its first part (every forward): tokens and documents in, parameters ready (hooks, bf16).
  void stage_inputs(const Tensor& tokens, const Tensor& doc_ids);
  // From doc_ids: whether the rows hold more than one document each, and if so the positions
  // and document starts (into pos_ids_ and doc_start_).
  void stage_documents(const Tensor& doc_ids);
  void queue_forward(bool has_targets, double dloss, bool training = false);
  void queue_trunk(bool training);  // the embeddings, blocks and final norm
  // The LM head and the loss (in training with its backward into dnf_ and the head's gradient;
  // row_scale: per-row weights of the loss's gradient).
  void queue_head(bool has_targets, double dloss, bool training, const Tensor& row_scale = {});
  float read_loss();
  void queue_step(double dloss);  // queue_forward for training, then backward_blocks
  void run_step(double dloss);    // queue_step, through the CUDA graph when on
  void backward_blocks();
  void grads_ready(int64_t group);  // settles the group's gradients, then hooks().grads_ready
  // The captured training step (cudaGraphExec_t) and what it was captured with; copies of a
  // Transformer start without one.
  struct StepGraph {
    void* exec = nullptr;
    double dloss = 0;
    int32_t ignore = 0;
    bool packed = false;
    uint64_t frees = 0;                     // cuda::frees() when captured
    double last_dloss = __builtin_nan("");  // the previous call's scale (capture when repeated)
    int failures = 0;                       // failed captures (two turn graphs off)
    int64_t launches = 0, captures = 0;
    StepGraph() = default;
    StepGraph(const StepGraph&) {}
    StepGraph& operator=(const StepGraph&);
    ~StepGraph() { reset(); }
    void reset();
  };
  bool cuda_graphs_ = false;
  StepGraph graph_;
  Norm::Saved nf_;
  BlockScratch scratch_;
  Tensor tokens_, targets_;
  Tensor pos_ids_, doc_start_;  // (B, T) int32 on the device, for packed rows
  // Sequence parallelism: the group's (row_shards() B, T), gathered, for attention and RoPE on
  // the group's rows (positions_ then points at them; pos_ids_ stays this rank's rows').
  Tensor group_pos_ids_, group_doc_start_;
  bool packed_rows_ = false;  // set_packed_rows
  // This rank's rows' position ids while the batch is packed (else undefined).
  Tensor own_position_ids() const;
  // ModelConfig::embed_scale's factor, sqrt(C) rounded to fp32 (as Gemma's embed_scale buffer).
  double embed_scale() const {
    return static_cast<float>(std::sqrt(static_cast<double>(cfg_.n_embd)));
  }
  Tensor host_pos_ids_, host_doc_start_;  // their host staging (GPU only)
  int32_t ignore_index_ = -100;
  int64_t target_count_ = 0;
  std::vector<int64_t> row_targets_;
  Tensor row_scale_, host_row_scale_;  // (B T) per-token weights of forward_backward_rows
  Tensor group_row_scale_;  // ... of the group's rows (vocabulary and sequence parallelism)
  Distillation distill_;
  bool adapters_off_ = false;
  // (B T) KL terms; with the vocabulary split, a chunk's statistics (backend/distill_stats.h)
  // and other ranks' rows' KL terms (plan_distillation).
  Tensor kl_, distill_stats_, all_distill_stats_, other_kl_;
  void plan_distillation();
  double mean_kl_ = 0;
  double mean_lse_sq_ = 0, z_loss_ = 0;
  double neftune_alpha_ = 0;
  uint64_t neftune_key_ = 0, neftune_calls_ = 0;
  uint64_t lora_drop_key_ = 0, lora_drop_calls_ = 0;
  Tensor noise_, host_noise_;  // (B, T, C) NEFTune's noise, and its host staging on a GPU
  void stage_noise();

  const Tensor& lm_head_weight() const { return lm_head_->matmul_weight(); }
  // The LM head: logits = h W^T, soft-capped under model.logit_softcap.
  void head_matmul(const Tensor& logits, const Tensor& h) const;
  // Where the loss writes the gradient of a chunk's (R rows) logits meant for dl: dl itself, or
  // with soft-capping dcap_, which uncap_grad then takes through the cap into dl.
  Tensor capped_grad(const Tensor& dl, int64_t R) const;
  void uncap_grad(const Tensor& dl, const Tensor& g, const Tensor& logits) const;
};

}  // namespace lmforge
