// lmforge plan: what a training run needs before it runs. For a config and a number of ranks it
// predicts, per sharding strategy, each rank's memory (training_footprint: the figures DataParallel
// reports holding, plus the activations Transformer::plan would take,
// measured without allocating), the bytes each rank sends per step (the ring algorithm's, as
// dist/communicator.h counts them), the training FLOPs and the time at a given rate, and
// recommends the strategy that fits with the least communication.
//
//   Plan p = make_plan(cfg, {.ranks = 8, .memory_bytes = 80.0 * (1 << 30), .tflops = 989});
//   fmt::print("{}", format_plan(p));
#pragma once

#include <string>
#include <vector>

#include "lmforge/io/config.h"
#include "lmforge/nn/block.h"

namespace lmforge {

// What one rank holds for training under a sharding strategy (dist/data_parallel.h), in bytes:
//   values      every parameter's (fp32, or bf16 master weights; + a bf16 copy of each under bf16
//               precision), or under full-shard its 1/N shard;
//   gather      full-shard's buffers: embeddings, head and two blocks (+ their bf16 copies);
//   gradients   the whole-model buffer (no-shard, zero1: under LoRA the adapters' part, the rest
//               never paged in), or the 1/N accumulator (twice with gradient accumulation) and
//               the backward's workspace of embeddings, head and two blocks;
//   optimizer   AdamW's two fp32 moments per trained parameter (LoRA under bf16 master weights:
//               and an fp32 master), 1/N of them from zero1 on (Muon: one for the blocks'
//               matrices, and its Newton-Schulz workspace);
//   reference   DPO's or KTO's frozen model, or distillation's teacher (fp32 values, + bf16
//               copies under bf16), or under full-shard its 1/N shard and its own gather
//               buffers.
struct TrainingFootprint {
  double values = 0, gather = 0, gradients = 0, optimizer = 0, reference = 0;
  double total() const { return values + gather + gradients + optimizer + reference; }
};
struct FootprintOptions {
  bool bf16 = false, bf16_master = false;
  bool reference = false;  // a frozen reference model is held (not precomputed and released)
  // Its shape where it is not the model's: distillation's teacher (its share under tensor
  // parallelism); null: the model's.
  const ModelConfig* frozen = nullptr;
  bool frozen_bf16 = false;  // its values in bf16 alone (train/trainer.h teacher_in_bf16)
  // Per micro-batch, forwards without a backward, whose blocks full-shard gathers
  // (step_traffic_bytes): the reference's (DPO 1; KTO 2, 1 without KL rows; the teacher 1) and
  // the policy's (KTO's KL rows; under LoRA also the reference's, the policy with its adapters
  // off).
  int reference_forwards = 0, policy_forwards = 0;
  int strategy = 0;          // dist::Strategy
  int shards = 1;            // N: the ranks the state is sharded over (a node's under hybrid)
  bool accumulates = false;  // train.grad_accum > 1 (the sharded accumulator's second buffer)
  bool muon = false;         // train.optimizer: muon (one moment for the blocks' matrices)
  bool muon_bf16 = false;    // its Newton-Schulz products in bf16 (their operands' copies)
  // The model is one rank's share under dist.tensor_parallel: N (Muon orthogonalizes the whole
  // model's matrices, with one share's direction beside them).
  int tensor_parallel = 1;
};
TrainingFootprint training_footprint(const ModelConfig& model, const FootprintOptions& o);

// One micro-batch's activations as the training model plans them (Transformer::plan, measured
// without allocating), in bytes. The model is one rank's share under tensor parallelism (tp > 1:
// its row-parallel outputs fp32, its vocabulary split where model.vocab_size is not whole_vocab,
// under sequence parallelism its rows batch / tp); forward_only: a frozen model's forwards (a
// DPO or KTO reference's, a teacher's), as setup_run plans them.
struct ActivationShape {
  int64_t batch = 1, seq = 1;
  bool bf16 = false, gpu = false;
  Recompute recompute = Recompute::kNone;
  int tp = 1;
  bool sequence_parallel = false;
  int64_t whole_vocab = 0;  // 0: the model's
};
double activation_bytes(const ModelConfig& model, const ActivationShape& s,
                        bool forward_only = false);

struct PlanOptions {
  int ranks = 1;
  int ranks_per_node = 0;   // 0 = all ranks on one node
  double memory_bytes = 0;  // per rank; 0 = unknown (nothing is said to fit)
  double tflops = 0;        // per rank's peak; 0 = no time estimate
  double mfu = 0.4;         // the share of the peak a step reaches
};

// A training process's memory beside its tensors on a CPU: the binary, oneDNN's and the C++
// runtime's pages, OpenMP's threads (measured: ~187 MiB peak RSS above the planned tensors,
// gpt2-tiny to GPT-2 124M, 2026-12-07). A GPU's context is not counted.
constexpr double kCpuRuntimeBytes = 190.0 * (1 << 20);

struct StrategyPlan {
  int strategy = 0;                // dist::Strategy
  int tensor_parallel = 1;         // dist.tensor_parallel (groups of N ranks; strategy across them)
  bool sequence_parallel = false;  // dist.sequence_parallel (each rank its own rows)
  TrainingFootprint state;
  double activations = 0;  // bytes (Transformer::plan's arena for the micro-batch)
  double runtime = 0;      // the process itself on a CPU (kCpuRuntimeBytes); 0 on a GPU
  double total() const { return state.total() + activations + runtime; }
  double sent_bytes = 0;  // per step and rank (ring algorithm's bytes)
  bool fits = false;
};

struct Plan {
  PlanOptions options;
  ModelConfig model;
  int64_t batch = 0, seq = 0, grad_accum = 1, steps = 0;
  double params = 0, trained = 0;
  // training (ModelConfig::flops_per_token; + a teacher's forward, DPO's or KTO's reference
  // forwards and KTO's KL rows' forwards)
  double flops_per_token = 0;
  double tokens_per_step = 0, tokens = 0;
  std::string recompute;  // train.activation_checkpointing
  std::vector<StrategyPlan> strategies;
  int recommended = -1;  // index into strategies; -1 = none fits (or memory unknown)
  double seconds = 0;    // 0 = unknown
};

// Throws Error naming the key or option for a config or option that cannot be planned.
Plan make_plan(const Config& cfg, const PlanOptions& o);
std::string format_plan(const Plan& p);

// Bytes one rank sends per optimizer step under a strategy (ring algorithm's: an all-reduce of B
// bytes sends 2(N-1)/N B, a reduce-scatter or all-gather (N-1)/N B): its gradients (every
// micro-batch's under grad-/full-shard), its updated values (zero1, grad-shard), full-shard's
// gathers (embeddings and head once a step; blocks before their forward and backward, those still
// in its two buffers excepted), hybrid's all-reduce across nodes, and under Muon with sharded
// state each matrix's update direction all-gathered (fp32).
double step_traffic_bytes(const ModelConfig& m, const FootprintOptions& o, int ranks,
                          int64_t grad_accum);
// What tensor_parallel_traffic_bytes counts besides the training step's own collectives.
struct TensorParallelTraffic {
  bool full_recompute = false;     // train.activation_checkpointing: full
  bool sequence_parallel = false;  // dist.sequence_parallel
  bool bf16_inputs = false;        // its norms' outputs gathered in bf16 (train.precision: bf16)
  // Per micro-batch, forwards without a backward over the group's shares: DPO's reference (1);
  // KTO's KL rows through the policy and the reference and its batch through the reference (3;
  // 1 under apo_zero_unpaired, without KL rows).
  int64_t extra_forwards = 0;
  // KTO's KL rows under sequence parallelism: made from the group's rows, whose tokens and
  // targets are gathered (8 bytes a token).
  bool kl_rows = false;
  // Sequence parallelism with grad-shard, full-shard or hybrid across the groups: the once-a-step
  // sums run on gradient shards of 1/data_shards (about: the shards cut through parameters).
  int data_shards = 1;
  // Vocabulary parallelism (train/trainer.h vocab_parallel): per forward the embeddings'
  // all-reduce and the gather of the loss's row statistics (24 bytes a row), per backward the LM
  // head's input gradient's all-reduce; rows_weighed: a per-row objective (DPO, ORPO, SimPO,
  // KTO) whose loss head runs twice (the rows' weights first).
  bool vocab_parallel = false;
  bool rows_weighed = false;
  // Distillation's teacher (its whole shape): per micro-batch its forward over the group's shares
  // (its own partial sums; under sequence parallelism its gathers and reduce-scatters, with the
  // vocabulary split its tokens gathered, its embeddings summed and its final norm's outputs
  // gathered), and with the vocabulary split the loss's statistics of both models (40 bytes a
  // row instead of 24).
  const ModelConfig* teacher = nullptr;
  // data.packing best_fit under sequence parallelism: the group's position ids and document
  // starts gathered every forward (8 bytes a row's token; the extra forwards' too).
  bool packed_rows = false;
  // train.optimizer: muon: the whole model's Muon matrix elements (their shares' update
  // directions all-gathered over the group once a step, and each orthogonalized matrix broadcast
  // from the rank that took it).
  double muon_elements = 0;
};
// Bytes one rank sends per optimizer step for tensor parallelism's partial sums
// (dist/tensor_parallel.h) in a group of tp: per micro-batch and block 4 all-reduces of the
// (B, T, C) fp32 activations (6 with full activation checkpointing, whose recomputed forward sums
// again; 2 per extra forward), each 2(tp-1)/tp of its bytes (and vocabulary parallelism's, see
// TensorParallelTraffic). With sequence parallelism (B: each
// rank's own rows), per block the gathers of the norms' outputs (2 in forward, again in backward;
// bf16 with bf16_inputs) and of the output gradients (2), and the reduce-scatters of the partial
// sums (2 in forward, 2 in backward; full recomputation repeats the forward's), each (tp-1)/tp of
// the group's buffer (an extra forward: the forward's gathers and reduce-scatters); and per step
// an all-reduce of the gradients of the parameters fed by each rank's rows (embeddings, norms,
// head).
double tensor_parallel_traffic_bytes(const ModelConfig& m, int64_t batch, int64_t seq, int tp,
                                     int64_t grad_accum, const TensorParallelTraffic& o = {});

}  // namespace lmforge
