// Linear layer: out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC). Weight layout matches
// torch.nn.Linear, so HF checkpoints map without transposes.
//
// With a LoRA adapter (Hu et al. 2021; models/config.h): out += s (inp A^T) B^T, s = alpha / r,
// A = lora_a (r, C) and B^T = lora_b (r, OC): B is stored transposed so that both of the
// adapter's products are the linear ops' own (out += t B^T is linear_backward's dinp += dout W).
// The base weight and bias are then frozen: backward computes no gradient for them.
//
//   Linear l; l.declare(ps, "blocks.0.attn.qkv", C, 3 * C, true, /*lora_rank=*/8, /*scale=*/2);
//   l.forward(out, x, t);        // t (N, r): s (x A^T), kept for backward
//   l.backward(dx, dout, x, t, dt);  // dt (N, r): scratch
#pragma once

#include <string>

#include "lmforge/backend/ops.h"
#include "lmforge/nn/params.h"

namespace lmforge {

struct Linear {
  Param* weight = nullptr;
  Param* bias = nullptr;
  Param* lora_a = nullptr;  // (r, C)
  Param* lora_b = nullptr;  // (r, OC): B transposed
  double lora_scale = 0;
  bool lora_off = false;  // the adapter skipped (forward only: DPO's reference under LoRA)
  // The output is a partial sum that another rank adds the bias to (tensor parallelism's
  // row-parallel layers, nn/block.h PartialSums): forward leaves the bias out; backward still
  // computes its gradient (the output's gradient is whole on every rank).
  bool bias_elsewhere = false;

  void declare(ParamSet& ps, const std::string& name, int64_t in, int64_t out, bool has_bias,
               int64_t lora_rank = 0, double scale = 0) {
    weight = ps.add(name + ".weight", {out, in}, true);
    weight->matmul = true;
    bias = has_bias ? ps.add(name + ".bias", {out}, false) : nullptr;
    if (lora_rank > 0) {
      lora_a = ps.add(name + ".lora_a", {lora_rank, in}, true);
      lora_b = ps.add(name + ".lora_b", {lora_rank, out}, true);
      lora_a->matmul = lora_b->matmul = true;
      lora_scale = scale;
    }
  }
  bool has_lora() const { return lora_a != nullptr; }
  int64_t lora_rank() const { return lora_a ? lora_a->shape[0] : 0; }

  // t: the adapter's (N, r) fp32 activation s (inp A^T), written here and read by backward
  // (needed with an adapter; decode passes a temporary). out must be fp32 then.
  void forward(const Tensor& out, const Tensor& inp, const Tensor& t = {}) const {
    ops::linear_forward(out, inp, weight->matmul_weight(),
                        bias && !bias_elsewhere ? bias->fp32() : Tensor());
    if (!lora_a || lora_off) return;
    const Tensor tt = t.defined() ? t
                                  : Tensor::empty({inp.numel() / inp.size(-1), lora_rank()},
                                                  DType::kF32, inp.device());
    ops::linear_forward(tt, inp, lora_a->matmul_weight(), Tensor());
    ops::scale(tt, lora_scale);
    // out += t B^T: linear_backward's dinp += dout W with dout = t, W = lora_b (no weight
    // gradient; `out` only sizes the rows).
    ops::linear_backward(out, Tensor(), Tensor(), tt, out, lora_b->matmul_weight());
  }
  // dinp, and the trainable parameters' gradients, += (a weight's first of the step written:
  // Param::grad_unwritten; dinp written when !dinp_accumulate). t: forward's; dt: (N, r) scratch.
  void backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, const Tensor& t = {},
                const Tensor& dt = {}, bool dinp_accumulate = true) const {
    const bool train_w = !weight->frozen;
    ops::linear_backward(
        dinp, train_w ? weight->grad : Tensor(), bias && !bias->frozen ? bias->grad : Tensor(),
        dout, inp, weight->matmul_weight(), !train_w || weight->accumulate_grad(), dinp_accumulate);
    if (!lora_a) return;
    // d(lora_b) += t^T dout; dt = dout B (then the scale); dinp += dt A, d(lora_a) += dt^T inp.
    ops::linear_backward(Tensor(), lora_b->grad, Tensor(), t, dout, lora_b->matmul_weight(),
                         lora_b->accumulate_grad());
    ops::linear_forward(dt, dout, lora_b->matmul_weight(), Tensor());
    ops::scale(dt, lora_scale);
    ops::linear_backward(dinp, lora_a->grad, Tensor(), dt, inp, lora_a->matmul_weight(),
                         lora_a->accumulate_grad());
  }
};

}  // namespace lmforge
