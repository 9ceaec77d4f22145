// AdamW (Loshchilov & Hutter 2019) over a ParamSet, matching torch.optim.AdamW. Weight decay
// applies only to parameters with decay=true (matrices; not norms, biases or embeddings). Frozen
// parameters (LoRA's base weights) have no slot: no state, never updated.
// The optimizer works on slots: contiguous pieces of parameters with their value and gradient.
// Unsharded, a slot is a whole parameter; under ZeRO (dist/data_parallel.h) each rank owns the
// pieces of its shard, with the gradient taken from the reduce-scattered shard. Moments live in
// one buffer, one pair per slot; checkpoints save them by parameter name.
//
//   AdamW opt(model.params(), {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
//   opt.step(lr);                                              // or, clipped:
//   opt.step(lr, clip_coef(grad_norm(model.params()), 1.0));  // optim/clip.h
#pragma once

#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/nn/params.h"

namespace lmforge {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  uint64_t seed =
      0;  // bf16 master weights: the stochastic rounding's seed (core/stochastic_round.h)
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
  const Tensor& m(size_t i) const { return m_[i]; }
  const Tensor& v(size_t i) const { return v_[i]; }
  size_t state_bytes() const { return state_.capacity(); }

 private:
  ParamSet& params_;
  AdamWOptions opt_;
  std::vector<OptSlot> slots_;
  Arena state_;
  std::vector<Tensor> m_, v_;
  std::vector<ops::AdamwItem> items_;  // step()'s list, kept: a step allocates nothing
  int64_t t_ = 0;
};

// Whole-parameter slots of every parameter of ps that trains (not frozen: LoRA).
std::vector<OptSlot> whole_slots(ParamSet& ps);

}  // namespace lmforge
