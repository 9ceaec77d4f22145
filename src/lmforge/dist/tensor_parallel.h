// Tensor parallelism (dist.tensor_parallel: N), as Megatron-LM (Shoeybi et al. 2019) splits a
// transformer: each of the N ranks of a tensor-parallel group holds every block's share of the
// attention heads and of the MLP's hidden units, and a model of that share's shape
// (tensor_parallel_config: n_head, n_kv_head and ffn_hidden divided by N):
//   column-parallel  attn.qkv (its q, k and v heads) and mlp.fc (gate and up) by output rows;
//   row-parallel     attn.proj and mlp.proj by input columns: their outputs are partial sums,
//                    added over the group before the residual add (rank 0 adds the bias), and
//                    the norms' input gradients likewise in backward (nn/block.h PartialSums);
//   replicated       the embeddings, norms, LM head and the row-parallel biases: the same on
//                    every rank of the group (their gradients come from whole tensors).
// Per block that is two all-reduces of (B, T, C) in forward and two in backward; each rank
// computes and holds 1/N of the blocks' matmuls, weights, gradients, optimizer state and attention
// and MLP activations. The ranks of a group are consecutive (rank = dp * N + tp, within a node);
// data parallelism (no-shard) runs across the groups, over the ranks of equal tp.
//
// Checkpoints hold the whole model, as one process would write it (gather() onto the group's rank
// 0; a load takes each rank's share of it), so they resume with any tensor_parallel and export as
// usual.
//
//   Transformer share(tensor_parallel_config(cfg, 2));
//   copy_tensor_parallel_share(whole, share, 2, tp_rank);  // initial values
//   TensorParallel tp(tp_comm, cfg, share);                // the blocks' sums go over tp_comm
#pragma once

#include <memory>

#include "lmforge/dist/communicator.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"

namespace lmforge::dist {

// The model one of `tp` ranks holds (head size and everything else kept). Throws Error naming
// dist.tensor_parallel when the heads, the key/value heads or the MLP's width do not divide, or
// for what tensor parallelism does not cover yet (q/k norms, LoRA adapters).
ModelConfig tensor_parallel_config(const ModelConfig& whole, int tp);

// Whether parameter `name` is held whole on every rank of a group (the rest are split).
bool tensor_parallel_replicated(const std::string& name);

// Copies rank r's share of every parameter from `whole` (fp32 values on the host) into `share`
// (tensor_parallel_config(whole's, tp); fp32 values, on the host or a GPU).
void copy_tensor_parallel_share(const Transformer& whole, Transformer& share, int tp, int r);

class TensorParallel final : public PartialSums {
 public:
  // tp: the group (its rank r holds share r); whole: the model split; model: this rank's share,
  // whose blocks' partial sums go over tp from now on.
  TensorParallel(Communicator& tp, const ModelConfig& whole, Transformer& model);
  ~TensorParallel() override;
  TensorParallel(const TensorParallel&) = delete;
  TensorParallel& operator=(const TensorParallel&) = delete;

  int size() const { return comm_.size(); }
  int rank() const { return comm_.rank(); }
  void sum(const Tensor& t) const override;
  // The partial sums' traffic so far (this rank's; CountingCommunicator's convention).
  const CommStats& comm_stats() const { return comm_.stats(); }

  // The global gradient norm of the whole model (no-shard data parallelism: every rank holds its
  // share's reduced gradients): the shares' sums of squares added over the group, the replicated
  // parameters counted once.
  double grad_norm();
  // Collective over the group: the whole model's values (and, with opt, AdamW's moments and step
  // count into whole_opt, an AdamW over every parameter of whole) assembled on the group's rank 0
  // into `whole` (unused elsewhere: pass null). Checks that the replicated parameters are equal
  // on every rank.
  void gather(Transformer* whole, const AdamW* opt, AdamW* whole_opt);
  // This rank's share of whole_opt's moments and step count (not collective; opt over every
  // parameter of the share, whole_opt over every parameter of the whole model).
  void copy_optimizer_share(const AdamW& whole_opt, AdamW& opt) const;

 private:
  mutable CountingCommunicator comm_;
  ModelConfig whole_;
  Transformer& model_;
};

}  // namespace lmforge::dist
