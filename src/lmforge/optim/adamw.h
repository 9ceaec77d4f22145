// AdamW (Loshchilov & Hutter 2019) over a ParamSet, matching torch.optim.AdamW. Weight decay
// applies only to parameters with decay=true (matrices; not norms, biases or embeddings). Frozen
// parameters (LoRA's base weights) have no slot: no state, never updated.
// With Muon on (train.optimizer: muon), the blocks' matrices (muon_param) step with Muon instead,
// matching torch.optim.Muon: a momentum buffer (their m; no v), orthogonalized by a Newton-Schulz
// iteration (in fp32, where torch uses bf16), as in Keller Jordan's and Moonlight's set-ups where
// the embeddings, the head and the vectors stay with AdamW.
// The optimizer works on slots: contiguous pieces of parameters with their value and gradient.
// Unsharded, a slot is a whole parameter; under ZeRO (dist/data_parallel.h) each rank owns the
// pieces of its shard, with the gradient taken from the reduce-scattered shard. Moments live in
// one buffer, one pair per slot (with fp32_masters, an fp32 master of each bf16 value beside
// them); checkpoints save them by parameter name.
// Muon over pieces (Moonlight's distributed Muon, Liu et al. 2025): each rank updates its pieces
// of the momentum, the whole update direction is all-gathered (set_muon_gather), orthogonalized
// by the ranks holding a piece of the matrix and applied to their pieces.
//
//   AdamW opt(model.params(), {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
//   opt.step(lr);                                              // or, clipped:
//   opt.step(lr, clip_coef(grad_norm(model.params()), 1.0));  // optim/clip.h
#pragma once

#include <functional>
#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/nn/params.h"

namespace lmforge {

struct MuonOptions {
  bool on = false;
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  double a = 3.4445, b = -4.7750, c = 2.0315;  // the quintic's coefficients
  double eps = 1e-7;                           // floor of the Frobenius norm it divides by
  // The step's learning rate per matrix (R, C): lr * 0.2 sqrt(max(R, C)) (match_rms_adamw:
  // Moonlight's, so AdamW's lr and weight decay carry over) or lr * sqrt(max(1, R / C))
  // (original: Keller Jordan's, with a larger lr).
  bool match_rms_adamw = true;
  double lr_ratio = 1.0;  // the Muon matrices' lr over the step's lr (train.muon_lr / train.lr)
  // The Newton-Schulz products as bf16 matmuls (fp32 accumulation and iterate), as torch runs
  // them (in bf16 throughout); else fp32. train.precision: bf16 sets it where bf16 matmuls are
  // the faster (a GPU, AMX, Zen 4).
  bool bf16 = false;
};

// The parameters Muon steps when it is on: the blocks' 2-D matrices that train.
bool muon_param(const Param& p);

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  uint64_t seed =
      0;  // bf16 master weights: the stochastic rounding's seed (core/stochastic_round.h)
  // bf16 values (master weights in bf16) keep an fp32 master each in the optimizer state: the
  // update runs on it and the value becomes its nearest bf16, exactly as fp32 master weights with
  // bf16 copies train, rather than rounding stochastically. For LoRA, whose adapters are few
  // beside the frozen weights (PEFT keeps them fp32 over a bf16 model).
  bool fp32_masters = false;
  MuonOptions muon{};
};

// Elements [begin, begin + len) of *param (flattened); value, grad and value_bf16 (optional)
// are 1-D tensors of len elements that the step reads and writes.
struct OptSlot {
  const Param* param = nullptr;
  int64_t begin = 0, len = 0;
  Tensor value, grad, value_bf16;
  bool whole() const { return begin == 0 && len == param->shape.numel(); }
};

class AdamW {
 public:
  // Every parameter of `params`, whole.
  AdamW(ParamSet& params, const AdamWOptions& opt);
  // The given slots (a shard); bf16 copies named in slots are rewritten by step().
  AdamW(ParamSet& params, std::vector<OptSlot> slots, const AdamWOptions& opt);
  // grad_scale multiplies every gradient as it is read (gradient clipping: clip_coef in
  // optim/clip.h), as torch's clip_grad_norm_ scaling them before the step would.
  void step(double lr, double grad_scale = 1.0);
  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }
  const std::vector<OptSlot>& slots() const { return slots_; }
  // First and second moments of slots()[i] (shaped like the parameter when the slot is whole).
  // A Muon slot has its momentum buffer as m and no v (!defined()).
  const Tensor& m(size_t i) const { return m_[i]; }
  const Tensor& v(size_t i) const { return v_[i]; }
  // AdamWOptions::fp32_masters: slot i's fp32 master (!defined() for fp32 values). Each element is
  // kept while it rounds to the value; step() widens the value into it wherever something else
  // wrote the value (a load, a checkpoint's weights without masters), so it never goes stale.
  const Tensor& master(size_t i) const { return w_[i]; }
  bool keeps_masters() const { return masters_; }
  size_t state_bytes() const { return state_.capacity() + ns_arena_.capacity(); }
  // "adamw", or "muon" when Muon steps the blocks' matrices (recorded in checkpoints).
  const char* name() const { return opt_.muon.on ? "muon" : "adamw"; }
  bool muon() const { return opt_.muon.on; }
  // Muon over slots that are pieces of matrices (ZeRO): gather(p, whole) fills `whole` (the fp32
  // elements of matrix p, flat, where the slots live) with every rank's piece of the update
  // direction; this rank's piece, if it holds one, is already in place. step() calls it for every
  // Muon matrix of the ParamSet in order, on every rank (a collective), whether it holds a piece
  // of it or not.
  using MuonGather = std::function<void(const Param& p, const Tensor& whole)>;
  void set_muon_gather(MuonGather gather) { muon_gather_ = std::move(gather); }
  // Tensor parallelism (dist/tensor_parallel.h): each Muon matrix of the set is one rank's share
  // of a larger one, which Muon orthogonalizes whole. whole_shape(p) is its shape; gather(p, x,
  // whole) assembles it (flat) from every rank's share x (flat, p's elements: a collective over
  // the group, called for the same matrices in the same order on its ranks); take(p, whole, x)
  // copies this rank's share of it back into x. The group's `ranks` split the Newton-Schulz
  // work: the matrices go in rounds of `ranks`, the k-th of round r orthogonalized by rank
  // (k + r) mod ranks alone (this one: `rank`), which then broadcast(whole, that rank)s the result
  // to the group (a collective). Plans the Newton-Schulz workspace again (whole matrices, a round's
  // shares of the direction).
  struct MuonShares {
    std::function<Shape(const Param& p)> whole_shape;
    std::function<void(const Param& p, const Tensor& x, const Tensor& whole)> gather;
    std::function<void(const Param& p, const Tensor& whole, const Tensor& x)> take;
    int ranks = 1, rank = 0;
    std::function<void(const Tensor& whole, int root)> broadcast;
  };
  void set_muon_shares(MuonShares shares);

 private:
  // Muon for the slot (whole or piece) of one matrix: the momentum and update direction of the
  // slot's elements written into x (the whole matrix's buffer, at the slot's place); then, after
  // the rest of x is filled, its orthogonalization and the slot's update.
  void muon_direction(size_t i, const Tensor& x, double grad_scale);
  void newton_schulz(Tensor& x, Tensor& next, int64_t R, int64_t C);
  // X (w: p's shape, or the whole matrix p is a share of) orthogonalized, each of p's row blocks
  // apart (Param::row_blocks); X and next may trade buffers.
  void orthogonalize(const Param& p, Tensor& X, Tensor& next, const Shape& w);
  // x: the slot's parameter's orthogonalized direction (flat, in its layout); w: as above, for
  // the lr adjustment of each block (its rows in the matrix Muon saw).
  void muon_apply(size_t i, const Tensor& x, double lr, const Shape& w);
  void muon_steps(double lr, double grad_scale);
  // Under tensor parallelism: round r of the Muon matrices this rank holds slots of (parameter
  // index j, slot i), orthogonalized over the group (set_muon_shares), its k-th by rank
  // (k + r) mod N.
  void muon_rounds(const std::vector<std::pair<size_t, int64_t>>& matrices, int r, double lr);
  void plan_muon_workspace(Device device);
  // Every master set to its value, widened (exact). Made so, a master that still rounds to its
  // value after a load elsewhere (--reset-optimizer) is that value widened: keep_master in step()
  // takes up the rest.
  void masters_from_values();

  ParamSet& params_;
  AdamWOptions opt_;
  // Muon's Newton-Schulz workspace, sized for the largest matrix: X and its next iterate, and
  // the Gram matrix with its polynomial (the smaller side squared); with bf16 products, the bf16
  // copies of the operands that are a matmul's weight.
  // Under tensor parallelism (set_muon_shares) also ns_share_, a round's shares of the direction
  // (one per rank of the group), and ns_other_, another rank's matrix whole (gathered, then
  // received orthogonalized).
  Tensor ns_x_, ns_next_, ns_gram_, ns_poly_, ns_x16_, ns_gram16_, ns_poly16_, ns_share_, ns_other_;
  Arena ns_arena_;
  MuonShares shares_;
  std::vector<OptSlot> slots_;
  Arena state_;
  std::vector<Tensor> m_, v_, w_;
  bool masters_ = false;
  std::vector<ops::AdamwItem> items_;  // step()'s list, kept: a step allocates nothing
  std::vector<int64_t> muon_slot_;     // per parameter of the set: its Muon slot, or -1
  MuonGather muon_gather_;
  int64_t t_ = 0;
};

// Whole-parameter slots of every parameter of ps that trains (not frozen: LoRA).
std::vector<OptSlot> whole_slots(ParamSet& ps);

}  // namespace lmforge
