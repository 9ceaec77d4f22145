// Tensor parallelism (dist.tensor_parallel: N), as Megatron-LM (Shoeybi et al. 2019) splits a
// transformer: each of the N ranks of a tensor-parallel group holds every block's share of the
// attention heads and of the MLP's hidden units, and a model of that share's shape
// (tensor_parallel_config: n_head, n_kv_head and ffn_hidden divided by N):
//   column-parallel  attn.qkv (its q, k and v heads) and mlp.fc (gate and up) by output rows;
//   row-parallel     attn.proj and mlp.proj by input columns: their outputs are partial sums,
//                    added over the group before the residual add (rank 0 adds the bias), and
//                    the norms' input gradients likewise in backward (nn/block.h PartialSums);
//   vocabulary       the token embeddings and the LM head by rows (Megatron's
//                    VocabParallelEmbedding and parallel cross-entropy; tensor_parallel_config's
//                    vocab_parallel, where train/trainer.h's vocab_parallel allows it): the
//                    embeddings' rows summed over the group, the loss from every rank's per-row
//                    statistics, the head's input gradient summed
//                    (Transformer::set_vocab_parallel);
//   replicated       the norms, the row-parallel biases, learned positions (and the embeddings
//                    and head where the vocabulary is not split): the same on every rank of the
//                    group (their gradients come from whole tensors; the q/k norms' (Qwen3) from
//                    each rank's heads, summed over the group).
// LoRA adapters follow their layer: a column-parallel layer's B^T split by its output units (its
// A replicated), a row-parallel layer's A by its inputs (its B^T replicated); the replicated
// one's gradient is a partial sum on each rank, summed over the group.
// Per block that is two all-reduces of (B, T, C) in forward and two in backward (and with the
// vocabulary split, per micro-batch one more each way plus the loss's statistics, 3 doubles a
// row; under sequence parallelism gathers and reduce-scatters instead); each rank
// computes and holds 1/N of the blocks' (and the head's) matmuls, weights, gradients, optimizer
// state and attention and MLP activations. The ranks of a group are consecutive (rank = dp * N +
// tp, within a node); data parallelism runs across the groups, over the ranks of equal tp.
//
// Sequence parallelism (dist.sequence_parallel, as Megatron-LM's, Korthikanti et al. 2022): the
// norms, residual adds, embeddings and LM head run on each rank's own rows (B, T) alone, attention
// and the MLP on the group's (N B, T): the all-reduces become an all-gather of the rows before
// the column-parallel matmuls and a reduce-scatter after the row-parallel ones (the same bytes),
// and the activations outside attention and the MLP are 1/N of the group's. Megatron splits the
// group's tokens along the sequence; lmforge gives each rank its own rows, which for these
// per-token ops is the same split and keeps every sequence whole on one rank. The gradients of
// the replicated parameters fed by a rank's own rows (embeddings, norms, head) are then summed
// over the group after each step's backward, and each rank reads its own slice of the batch.
// With the vocabulary split, each rank embeds and scores the group's rows (gathered) with its
// part of the vocabulary and keeps its own rows' sums (Transformer::set_vocab_parallel).
//
// Data parallelism across the groups may shard too (grad-shard, full-shard, hybrid: "2-D"
// parallelism, as torchtitan composes FSDP with tensor parallelism): each rank then holds 1/D of
// its share's gradients (and values) over the D ranks holding that share.
//
// Checkpoints hold the whole model, as one process would write it (gather_param onto the group's
// rank 0, streamed into the files one parameter at a time; a load reads each rank's share of it:
// tensor_parallel_share_of), so they resume with any tensor_parallel and export as usual.
//
//   Transformer share(tensor_parallel_config(cfg, 2)), layout(cfg, Transformer::MeasureOnly{});
//   set_tensor_parallel_share(cfg, share, 2, tp_rank,         // initial values
//                             [&](auto& give) { layout.for_each_init_param(seed, give); });
//   TensorParallel tp(tp_comm, cfg, share);                // the blocks' sums go over tp_comm
#pragma once

#include <functional>
#include <map>
#include <memory>

#include "lmforge/core/packed_range.h"
#include "lmforge/dist/communicator.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"

namespace lmforge::dist {

// The model one of `tp` ranks holds (head size and everything else kept; with vocab_parallel
// 1/tp of the vocabulary). Throws Error naming dist.tensor_parallel when the heads, the key/value
// heads, the MLP's width (or the vocabulary) do not divide.
ModelConfig tensor_parallel_config(const ModelConfig& whole, int tp, bool vocab_parallel = false);

// Where rank r of tp's share finds each of its parameters' elements in the whole model's
// tensors (a checkpoint's: load_checkpoint reads a share from them directly).
ShareOfWhole tensor_parallel_share_of(const ModelConfig& whole, int tp, int r,
                                      bool vocab_parallel = false);

// Whether parameter `name` is held whole on every rank of a group (the rest are split).
bool tensor_parallel_replicated(const std::string& name, bool vocab_parallel = false);

// Gives `share` (tensor_parallel_config(whole, tp)'s model) rank r's share of the whole model's
// values that `values` streams (every parameter of a layout of `whole`, each whole, one at a
// time: the whole model is never held; Transformer::for_each_init_param for a seed's,
// InitSource::values for init_from's).
void set_tensor_parallel_share(const ModelConfig& whole, Transformer& share, int tp, int r,
                               const ValueStream& values);

class TensorParallel final : public PartialSums {
 public:
  // tp: the group (its rank r holds share r); whole: the model split; model: this rank's share,
  // whose blocks' partial sums go over tp from now on (planned again under sequence
  // parallelism).
  TensorParallel(Communicator& tp, const ModelConfig& whole, Transformer& model,
                 bool sequence_parallel = false);
  ~TensorParallel() override;
  TensorParallel(const TensorParallel&) = delete;
  TensorParallel& operator=(const TensorParallel&) = delete;

  int size() const { return comm_.size(); }
  int rank() const { return comm_.rank(); }
  void sum(const Tensor& t) const override;
  int64_t row_shards() const override { return sequence_parallel_ ? size() : 1; }
  void gather(const Tensor& local, const Tensor& all) const override;
  void sum_scatter(const Tensor& all, const Tensor& local) const override;
  bool sequence_parallel() const { return sequence_parallel_; }
  // Whether the share holds 1/N of the vocabulary's embeddings and LM head (its config's
  // vocab_size is the whole's / N: Transformer::set_vocab_parallel), else all of them.
  bool vocab_parallel() const { return vocab_parallel_; }
  // Sequence parallelism: sums n numbers over the group (losses and target counts of the ranks'
  // own rows); nothing otherwise.
  void sum_over_group(double* v, int64_t n);
  // The gradients a rank holds after a step's data-parallel reduction: each parameter's own
  // (Param::grad; no `pack`), or under grad-/full-shard and hybrid the pieces of the
  // share's flat range [pack->lo(), pack->hi()) in `shard`, its trained elements packed (the same
  // range on every rank of the group: their shares are laid out alike).
  //
  // After a step's backward: sums over the group the gradients of the replicated parameters that
  // each rank computes in part: the q/k norms' (from its heads), LoRA's replicated factors', and
  // under sequence parallelism those its own rows fed (embeddings, norms, head; the row-parallel
  // biases' come from the group's rows).
  void sum_partial_grads(const Tensor& shard = Tensor(), const PackedRange* pack = nullptr);
  // The partial sums' traffic so far (this rank's; CountingCommunicator's convention).
  const CommStats& comm_stats() const { return comm_.stats(); }

  // The global gradient norm of the whole model: the shares' sums of squares added over the
  // group, the replicated parameters counted once; with a shard, also over `shards` (the ranks
  // whose shards make up the share).
  double grad_norm(const Tensor& shard = Tensor(), const PackedRange* pack = nullptr,
                   Communicator* shards = nullptr);
  // Collective over the group: parameter q of this rank's share made whole, on the group's rank
  // 0 (a host tensor of the whole model's shape; undefined elsewhere). what: its values (0) or
  // AdamW's first or second moment or fp32 master (1, 2, 3); take(q, what) gives this rank's share
  // of it whole and flat (DataParallel::whole_param, itself collective over the ranks sharding this
  // share; undefined where there is none: Muon's matrices have no second moment, and then so is the
  // result). writes: whether this group assembles (data-parallel rank 0's); the other groups'
  // ranks call it too, only to take the same parameters in the same order. Checks that a
  // replicated parameter's values are equal on every rank of the group. Checkpoints and the end's
  // sample hold the whole model one parameter at a time this way.
  using Take = std::function<Tensor(const Param& q, int what)>;
  Tensor gather_param(const Param& q, int what, const Take& take, bool writes = true);
  // Muon over this rank's share (AdamW::set_muon_shares): each matrix assembled whole over the
  // group (its rows, or its input columns, as share_runs lays them out), orthogonalized by one
  // rank of the group in turn and broadcast from it, and this rank's part taken back. `device`:
  // where the optimizer's buffers are.
  AdamW::MuonShares muon_shares(Device device);
  // The bytes of muon_shares' staging buffer (every rank's share of the largest matrix).
  size_t muon_staging_bytes() const { return muon_staging_bytes_; }

 private:
  // Every rank's `mine` (fp32, where the model is) placed into `out` (the whole parameter on the
  // host; undefined: this rank only takes part), rank r's share by runs[r].
  void assemble(const Tensor& mine, const std::vector<std::vector<ShareRun>>& runs,
                const Tensor& out);
  // f(param, gradient) over the gradients this rank holds of the trained parameters (see
  // sum_partial_grads: each whole, or the pieces in a shard).
  template <typename F>
  void for_each_grad(const Tensor& shard, const PackedRange* pack, F&& f);
  mutable CountingCommunicator comm_;
  ModelConfig whole_;
  Transformer& model_;
  bool sequence_parallel_;
  bool vocab_parallel_;
  size_t muon_staging_bytes_ = 0;
  std::shared_ptr<const std::map<std::string, Shape>> whole_shapes_;  // by parameter name
};

}  // namespace lmforge::dist
