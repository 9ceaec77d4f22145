// DataParallel: one optimizer step's gradients, clipping and update across the ranks of a
// Communicator, under the sharding strategies users know from DDP, DeepSpeed ZeRO and FSDP:
//   no-shard    (DDP)     gradients all-reduced in buckets during the backward of the last
//                         micro-batch; every rank holds everything and takes the same step.
//   zero1                 as no-shard, but each rank keeps AdamW state for its 1/N of the
//                         parameters, updates that shard and all-gathers the parameters.
//   grad-shard  (ZeRO-2)  + gradients reduce-scattered per micro-batch into a 1/N accumulator.
//   full-shard  (ZeRO-3)  + parameters kept as a 1/N shard: each block is all-gathered just before
//                         its forward and backward (the next one prefetched), into one of two
//                         buffers; embeddings and the head stay gathered for the step.
//   hybrid                full-shard within a node, replicated across nodes (the shard
//                         accumulator all-reduced between nodes).
// The flat parameter space (ParamSet::offset) is cut into contiguous per-rank ranges of
// ceil(N / ranks) elements (64-byte aligned), the same for every strategy, which is what sharded
// checkpoints record. The loss of a step is normalized by the number of target tokens over all
// ranks and micro-batches, so N ranks give the gradient of one process with the global batch.
//
//   DataParallel dp(world, model, cfg.dist, adamw_options, init);  // init: full-shard's values
//   double loss = dp.forward_backward(micro);  // all ranks
//   double norm = dp.clip_grad_norm(max_norm);
//   dp.step(lr);
#pragma once

#include <optional>
#include <vector>

#include "lmforge/core/packed_range.h"
#include "lmforge/data/loader.h"
#include "lmforge/dist/communicator.h"
#include "lmforge/dist/tensor_parallel.h"
#include "lmforge/io/config.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"

namespace lmforge::dist {

enum class Strategy { kNoShard, kZero1, kGradShard, kFullShard, kHybrid };
Strategy parse_strategy(const std::string& s);  // Error naming dist.strategy
const char* strategy_name(Strategy s);

// Element ranges [begin, end) of a flat space of n elements cut for `ranks` shards.
struct ShardLayout {
  int64_t n = 0, per_rank = 0;
  int ranks = 1;
  ShardLayout() = default;
  ShardLayout(int64_t n, int ranks);
  int64_t begin(int r) const { return std::min(n, per_rank * r); }
  int64_t end(int r) const { return std::min(n, per_rank * (r + 1)); }
  // Per rank: how many of [lo, hi) it owns.
  std::vector<int64_t> counts(int64_t lo, int64_t hi) const;
};

// The ranks whose rows make up a step's batch, as a per-row objective sees them: the data-parallel
// ranks (world), each with micro-batches of its own, and under sequence parallelism the ranks of
// this rank's tensor-parallel group (group), which split each of their group's micro-batches by
// rows (this rank's part(): rows [part() R, (part() + 1) R) of its group's parts() R).
struct RowRanks {
  Communicator& world;
  TensorParallel* group = nullptr;  // sequence parallelism's; null otherwise
  // Sums n numbers over every rank (each one's rows' terms).
  void sum(double* v, int64_t n) const;
  int64_t parts() const { return group ? group->size() : 1; }
  int64_t part() const { return group ? group->rank() : 0; }
  // This rank's place among the world's parts: its batch of each global batch in a sequential
  // read (world rank-major, then the part; as training splits its rows).
  int64_t index() const { return world.rank() * parts() + part(); }
  // A (R, ...) int32 tensor of this rank's rows made its group's (parts() R, ...) in `all`, in
  // rank order (a copy without sequence parallelism).
  void gather_rows(const Tensor& mine, const Tensor& all) const;
};

// Validation over `batches` global batches of a sequential read of val (each of the world's
// batch_size x ranks rows, sequence parallelism's parts included): the rank with index() i reads
// batch b * per + i, where per (returned) is the number of ranks' batches in one; batches is cut
// to the whole set once. The sums of what each rank scores are then ranks.sum()'s; with per 1
// there are none to make.
int64_t eval_rows(const RowRanks& ranks, const Loader& val, int64_t& batches);

// A loss over whole rows in place of the mean cross-entropy of their tokens (train/objective.h:
// DPO, ORPO, SimPO, KTO). Per step, forward_backward() calls begin(micro, ranks) on every rank,
// then for each micro-batch m weigh(m, logp, targets, w) with the policy's log-likelihood of each
// of this rank's rows' targets and the rows' target counts: it sets the rows' gradient weights
// (Transformer::RowWeigher) and returns the micro-batch's share of the global loss (the shares are
// summed over micro-batches and ranks); then end(ranks) (metrics over the ranks).
class RowObjective {
 public:
  virtual ~RowObjective() = default;
  virtual void begin(const std::vector<Batch>& micro, const RowRanks& ranks) = 0;
  virtual double weigh(size_t m, const std::vector<double>& logp,
                       const std::vector<int64_t>& targets, std::vector<float>& w) = 0;
  virtual void end(const RowRanks& ranks) {}
};

class DataParallel final : public GroupHooks {
 public:
  // The model must be planned. Under full-shard the model's value buffer is released: each
  // rank's shard of the values comes from `init` when given (every parameter of the model,
  // streamed one at a time: the whole model's values are never held), else from the model.
  // A model that trains nothing (every parameter frozen: DPO's or KTO's reference,
  // Transformer::plan_forward_only) under full-shard or hybrid has its values sharded and
  // gathered for its forwards alone: no gradient buffers, no optimizer state.
  DataParallel(Communicator& world, Transformer& model, const DistConfig& cfg,
               const AdamWOptions& opt, const ValueStream& init = {});
  ~DataParallel() override;
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  Strategy strategy() const { return strategy_; }
  Communicator& world() { return world_; }
  // Every collective this object has issued so far (this rank's traffic: CommStats), and the
  // time forward_backward() spent waiting for gradient collectives after the backward passes
  // (the part not hidden behind them).
  const CommStats& comm_stats() const { return counted_.stats(); }
  double grad_wait_s() const { return grad_wait_s_; }
  // The gradient collectives of one step's last micro-batch (and hybrid's cross-node
  // all-reduce), issued back to back with no backward to hide them behind and timed: the
  // second of two runs, in seconds. Call before the first step (it sums the gradients or
  // workspaces while they are zero, which leaves them so; the traffic is counted).
  double time_gradient_collectives();
  bool sharded_values() const { return vshard_.defined(); }
  const ShardLayout& layout() const { return layout_; }
  int shard_rank() const { return shard_comm_->rank(); }

  // Gradients of one step over the micro-batches (this rank's slice of the global batch),
  // reduced per the strategy. Returns the global token-weighted mean loss (and mean lse^2).
  // With an objective, the loss is the objective's (mean_lse_sq is then 0). mean_kl: under
  // knowledge distillation (Transformer::set_distillation), the mean KL term over the targets.
  double forward_backward(const std::vector<Batch>& micro, double* mean_lse_sq = nullptr,
                          RowObjective* objective = nullptr, double* mean_kl = nullptr);
  // The ranks with rows of their own (RowObjective's view; evaluation under sequence parallelism
  // splits each batch the same way).
  RowRanks row_ranks() { return {world_, tp_ && tp_->sequence_parallel() ? tp_ : nullptr}; }
  // Global gradient norm; when above max_norm, the next step() scales the gradients as torch's
  // clip_grad_norm_ would (inside the AdamW update: optim/clip.h).
  double clip_grad_norm(double max_norm);
  // Tensor parallelism (dist/tensor_parallel.h): the model is one rank's share
  // and the ranks given are those holding the same share; the gradient norm is then the whole
  // model's (TensorParallel::grad_norm).
  // (Muon then orthogonalizes the whole model's matrices: AdamW::set_muon_shares.)
  void set_tensor_parallel(TensorParallel* tp);
  // One parameter of this rank's model whole, flat, fp32: its values (what 0, where the model is)
  // or AdamW's first or second moment or fp32 master (1, 2, 3; a trained parameter; where AdamW's
  // state is, the host under dist.offload). Collective over
  // the shards' ranks where they hold it in pieces (every rank calls it for the same parameters in
  // the same order), else a view of this rank's own.
  Tensor whole_param(const Param& p, int what);
  // With AdamW's state sharded (zero1 and up): this rank's pieces from a whole state (`whole`: an
  // AdamW over this model's parameters; not collective).
  void take_optimizer(const AdamW& whole);
  // Multiplies this step's gradients by f (fault injection in tests).
  void scale_grads(double f);
  void step(double lr);
  // Validation loss over the first `batches` global batches (at most the whole set, once; each
  // rank scores its rows of each, eval_rows), the mean over their targets as the training loss
  // weighs them, the same on every rank; NaN when they hold no targets.
  double evaluate(const Loader& val, int64_t batches, Batch& batch);
  // dist.offload: AdamW keeps its state and a master copy of this rank's parameters (fp32, or
  // bf16 under bf16 master weights) in a host arena and steps there; step() copies the gradient
  // shard in and the new values out (device-to-host and back once the model lives on a GPU;
  // plain copies on the CPU). After the model's values are replaced (a checkpoint load),
  // refresh_master() copies them in again.
  bool offload() const { return offload_; }  // (on every rank, even one with nothing to step)
  void refresh_master();
  size_t host_bytes() const { return host_.capacity(); }
  AdamW& optimizer() { return *opt_; }
  const AdamW& optimizer() const { return *opt_; }

  // Under full-shard: this rank's values [layout().begin(r), end(r)) and a full copy of all
  // parameters into the model (allocates its value buffer; for sampling and export at the end).
  const Tensor& value_shard() const { return vshard_; }
  void gather_full_model();
  // The model's values replaced by `values` (flat, the whole model's; on any device): this rank's
  // shard of them under full-shard, and dist.offload's host copy.
  void assign_values(const Tensor& values);

  // What this rank holds, in bytes: AdamW state; parameters (the shard under full-shard, else all)
  // and the full-shard gather buffers; gradients (the whole-model buffer under no-shard/zero1;
  // under grad-/full-shard the 1/N accumulator, its second buffer and the backward's workspace:
  // embeddings, head and two blocks; each of the trained elements alone, under LoRA the
  // adapters').
  // (with Muon under tensor parallelism, its staging of the group's shares too)
  size_t optimizer_bytes() const {
    return opt_->state_bytes() + (tp_ ? tp_->muon_staging_bytes() : 0);
  }
  size_t parameter_bytes() const;
  size_t gather_buffer_bytes() const { return gather_.capacity(); }
  size_t gradient_bytes() const;

  void before_forward(int64_t group) override;
  void before_backward(int64_t group) override;
  void grads_ready(int64_t group) override;
  // One process and neither gradients nor values sharded: the hooks then do nothing a replayed
  // step would miss.
  bool graph_safe() const override {
    return world_.size() == 1 && !grad_sharded() && !sharded_values();
  }

 private:
  struct Bucket {
    int64_t lo, hi;
    int pending = 0, groups = 0;
    // The ranges of [lo, hi) that hold trained parameters (all of it but under LoRA): what
    // no-shard and zero1 all-reduce.
    std::vector<std::pair<int64_t, int64_t>> ranges;
  };
  void launch(Bucket& b, int64_t group);
  // grad-/full-shard: zeroes the trained ranges of group `group`'s workspace buffer `buf` (the
  // frozen weights' gradients are never written, sent nor read).
  void zero_workspace(const Tensor& buf, int64_t group);
  void all_reduce_across_nodes();
  void drain();
  void gather(int64_t group, bool wait);
  // The value shard from its element `at` all-gathered into `out` over the shard communicator:
  // fp32, or bf16 elements under bf16 master weights (the shard's dtype; `out` must match).
  WorkPtr gather_values(int64_t at, const Tensor& out, const std::vector<int64_t>& counts);
  // Points group `group`'s values (or gradients) into `buf`; with `bf16` (full-shard under bf16
  // precision) also its matmul weights' bf16 copies, converted from the values.
  void point_group(int64_t group, const Tensor& buf, bool grad = false, const Tensor& bf16 = {});
  // Every rank's piece of parameter p (ParamSet::offset's layout), in order, into out (p's
  // elements), over the shard communicator; mine: this rank's piece (a rank holding none sends
  // nothing), or null where it is already in place in out.
  void gather_param(const Param& p, const float* mine, float* out);
  int64_t group_lo(int64_t g) const;
  int64_t group_hi(int64_t g) const { return group_lo(g + 1); }
  std::vector<OptSlot> shard_slots(const Tensor& values, const Tensor& grads,
                                   const PackedRange* packed);
  bool grad_sharded() const { return strategy_ >= Strategy::kGradShard; }

  CountingCommunicator counted_;  // the world given, counted
  Communicator& world_;           // = counted_
  Communicator* shard_comm_;      // world, or the node under hybrid
  double grad_wait_s_ = 0;
  std::vector<std::pair<int64_t, int64_t>> trainable_;  // ParamSet::trainable_ranges
  std::unique_ptr<Communicator> node_comm_, cross_comm_;
  Transformer& model_;
  ParamSet& ps_;
  Strategy strategy_;
  ShardLayout layout_;
  int64_t my_lo_ = 0, my_hi_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<int> bucket_of_group_;
  std::vector<WorkPtr> works_;
  bool sync_ = false;
  bool first_micro_ = true;
  double grad_scale_ = 1.0;  // clip_grad_norm's factor for the next step()
  TensorParallel* tp_ = nullptr;
  Arena shard_arena_, gather_;
  // Gradient accumulator (the first micro-batch's reduce-scatter target), the later
  // micro-batches' target (untouched, so not resident, without gradient accumulation), values.
  Tensor gshard_, rs_tmp_, vshard_;
  bool rs_tmp_used_ = false;  // (mapped lazily: counted once written)
  Tensor embed_buf_, tail_buf_, block_buf_[2];
  // Full-shard under bf16: the matmul weights' bf16 copies, beside each gather buffer.
  Tensor embed_bf16_, tail_bf16_, block_bf16_[2];
  Arena grad_ws_;  // grad-/full-shard: the backward's gradient workspace (see the constructor)
  Tensor edge_grad_[2], block_grad_[2];
  std::vector<WorkPtr> block_grad_work_[2];  // the reduce-scatters reading block_grad_[i]
  // grad-/full-shard: the trained elements of this rank's shard (all of it but under LoRA), as
  // gshard_ and rs_tmp_ hold them, and of each group, as its workspace buffer holds them.
  PackedRange shard_pack_;
  std::vector<PackedRange> group_pack_;
  int64_t slot_block_[2] = {-1, -1};
  WorkPtr slot_work_[2], edge_work_[2];
  bool edges_gathered_ = false;
  Arena host_;  // dist.offload: master values and gradients
  bool offload_ = false;
  std::vector<OptSlot> host_slots_, device_slots_;
  std::unique_ptr<AdamW> opt_;
};

}  // namespace lmforge::dist
