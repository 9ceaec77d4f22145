// Linear layer: out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC). Weight layout matches
// torch.nn.Linear, so HF checkpoints map without transposes.
//
// With LoRA adapters (Hu et al. 2021; models/config.h): out += s (inp A^T) B^T, s = alpha / r, for
// each of the Hugging Face modules the layer holds (lora_pieces: their output widths, e.g. q, k
// and v of a fused qkv), each with its own A (r, C) and B (out_p, r), as PEFT's adapters on those
// modules. lora_a (P r, C) stacks the P A's; lora_b (r, OC) holds B^T, module p's in its columns
// (B stored transposed so that the adapter's products are the linear ops' own: out += t B^T is
// linear_backward's dinp += dout W). With P > 1 the B products run on the block-diagonal
// (P r, OC) expansion of lora_b (module p's columns in rows [p r, (p + 1) r), zero elsewhere),
// so one GEMM serves all P modules at P times the (small) flops of the B product.
// The base weight and bias are then frozen: backward computes no gradient for them.
//
//   Linear l; l.declare(ps, "blocks.0.attn.qkv", C, 3 * C, true, /*lora_rank=*/8, /*scale=*/2,
//                       {C, C, C});
//   l.forward(out, x, t, b_full);            // t (N, P r): s (x A^T), kept for backward
//   l.backward(dx, dout, x, t, dt, true, b_full, db_full);  // dt (N, P r): scratch
#pragma once

#include <string>
#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/nn/params.h"

namespace lmforge {

// LoRA's dropout in a training forward (LoraConfig::dropout; PEFT's lora_dropout): the key of
// this call's mask (ops::dropout_forward) and fp32 scratch of at least the input's elements for
// the dropped input (x) and, in backward, its gradient (g). Undefined x: no dropout (evaluation,
// decode).
struct LoraDropout {
  uint32_t key = 0;
  Tensor x, g;
};

struct Linear {
  Param* weight = nullptr;
  Param* bias = nullptr;
  Param* lora_a = nullptr;           // (P r, C): each module's A, stacked
  Param* lora_b = nullptr;           // (r, OC): B transposed, module p's B^T in its columns
  std::vector<int64_t> lora_pieces;  // the modules' output widths (summing to OC)
  double lora_scale = 0;
  double lora_dropout = 0;  // the adapters see dropout(inp) in training (LoraDropout)
  bool lora_off = false;    // the adapter skipped (forward only: DPO's reference under LoRA)
  // The output is a partial sum that another rank adds the bias to (tensor parallelism's
  // row-parallel layers, nn/block.h PartialSums): forward leaves the bias out; backward still
  // computes its gradient (the output's gradient is whole on every rank).
  bool bias_elsewhere = false;

  void declare(ParamSet& ps, const std::string& name, int64_t in, int64_t out, bool has_bias,
               int64_t lora_rank = 0, double scale = 0, std::vector<int64_t> pieces = {},
               double dropout = 0) {
    weight = ps.add(name + ".weight", {out, in}, true);
    weight->matmul = true;
    bias = has_bias ? ps.add(name + ".bias", {out}, false) : nullptr;
    if (lora_rank > 0) {
      if (pieces.empty()) pieces = {out};
      int64_t sum = 0;
      for (int64_t w : pieces) sum += w;
      LMF_CHECK(sum == out, "{}: LoRA modules of {} outputs in a layer of {}", name, sum, out);
      lora_pieces = std::move(pieces);
      const auto P = static_cast<int64_t>(lora_pieces.size());
      lora_a = ps.add(name + ".lora_a", {P * lora_rank, in}, true);
      lora_b = ps.add(name + ".lora_b", {lora_rank, out}, true);
      lora_a->matmul = lora_b->matmul = true;
      lora_scale = scale;
      lora_dropout = dropout;
    }
  }
  // Whether this call drops the adapters' input: a training forward (or its backward) with
  // dropout.
  bool lora_drops(const LoraDropout& drop) const { return lora_dropout > 0 && drop.x.defined(); }
  // The adapters' input: inp, or in a training forward with dropout its dropped copy in drop.x.
  Tensor lora_input(const Tensor& inp, const LoraDropout& drop) const {
    if (!lora_drops(drop)) return inp;
    LMF_CHECK(drop.x.dtype() == DType::kF32 && drop.x.numel() >= inp.numel(),
              "LoRA dropout scratch {} for an input {}", drop.x.shape().str(), inp.shape().str());
    const Tensor x = drop.x.view({-1}).slice(0, inp.numel()).view(inp.shape());
    ops::dropout_forward(x, inp, lora_dropout, drop.key);
    return x;
  }
  bool has_lora() const { return lora_a != nullptr; }
  int64_t lora_rank() const { return lora_b ? lora_b->shape[0] : 0; }
  int64_t lora_width() const { return lora_a ? lora_a->shape[0] : 0; }  // P r: t's columns
  // The (P r, OC) block-diagonal expansion of lora_b (see above) that the B products use, in its
  // matmul dtype; with one module lora_b itself. b_full: the caller's scratch of at least that
  // size (P > 1; undefined: a temporary, for decode).
  Tensor lora_b_weight(const Tensor& b_full) const {
    const Tensor& b = lora_b->matmul_weight();
    if (lora_pieces.size() == 1) return b;
    const int64_t r = lora_rank(), OC = b.size(1);
    Tensor full;
    if (b_full.defined()) {
      LMF_CHECK(b_full.dtype() == b.dtype() && b_full.numel() >= lora_width() * OC,
                "LoRA B scratch {} {} for a ({}, {}) {} expansion", b_full.shape().str(),
                dtype_name(b_full.dtype()), lora_width(), OC, dtype_name(b.dtype()));
      full = b_full.view({-1}).slice(0, lora_width() * OC).view({lora_width(), OC});
    } else {
      full = Tensor::empty({lora_width(), OC}, b.dtype(), b.device());
    }
    full.zero_();
    int64_t col = 0;
    for (size_t p = 0; p < lora_pieces.size(); ++p) {
      ops::copy_block(full, static_cast<int64_t>(p) * r, col, b, 0, col, r, lora_pieces[p]);
      col += lora_pieces[p];
    }
    return full;
  }

  // t: the adapters' (N, P r) fp32 activation s (inp A^T), written here and read by backward
  // (needed with adapters; decode passes a temporary). out must be fp32 then. b_full: see
  // lora_b_weight.
  void forward(const Tensor& out, const Tensor& inp, const Tensor& t = {},
               const Tensor& b_full = {}, const LoraDropout& drop = {}) const {
    ops::linear_forward(out, inp, weight->matmul_weight(),
                        bias && !bias_elsewhere ? bias->fp32() : Tensor());
    if (!lora_a || lora_off) return;
    const Tensor tt = t.defined() ? t
                                  : Tensor::empty({inp.numel() / inp.size(-1), lora_width()},
                                                  DType::kF32, inp.device());
    ops::linear_forward(tt, lora_input(inp, drop), lora_a->matmul_weight(), Tensor());
    ops::scale(tt, lora_scale);
    // out += t B^T: linear_backward's dinp += dout W with dout = t, W = lora_b (no weight
    // gradient; `out` only sizes the rows).
    ops::linear_backward(out, Tensor(), Tensor(), tt, out, lora_b_weight(b_full));
  }
  // dinp, and the trainable parameters' gradients, += (a weight's first of the step written:
  // Param::grad_unwritten; dinp written when !dinp_accumulate). t: forward's; dt: scratch of at
  // least (N, P r) elements. With P > 1: b_full as forward's, db_full fp32 scratch of at least (P
  // r, OC).
  void backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, const Tensor& t = {},
                const Tensor& dt = {}, bool dinp_accumulate = true, const Tensor& b_full = {},
                const Tensor& db_full = {}, const LoraDropout& drop = {}) const {
    const bool train_w = !weight->frozen;
    ops::linear_backward(
        dinp, train_w ? weight->grad : Tensor(), bias && !bias->frozen ? bias->grad : Tensor(),
        dout, inp, weight->matmul_weight(), !train_w || weight->accumulate_grad(), dinp_accumulate);
    if (!lora_a) return;
    // d(lora_b) += t^T dout; dt = dout B (then the scale); dinp += dt A, d(lora_a) += dt^T inp.
    const Tensor bw = lora_b_weight(b_full);  // (rebuilt: other layers share the scratch)
    const bool add_b = lora_b->accumulate_grad();
    if (lora_pieces.size() == 1) {
      ops::linear_backward(Tensor(), lora_b->grad, Tensor(), t, dout, bw, add_b);
    } else {
      // The whole (P r, OC) product, of which each module's diagonal block is its gradient.
      const int64_t r = lora_rank(), OC = bw.size(1);
      LMF_CHECK(db_full.defined() && db_full.dtype() == DType::kF32 &&
                    db_full.numel() >= lora_width() * OC,
                "LoRA B gradient scratch for a ({}, {}) expansion", lora_width(), OC);
      const Tensor dfull = db_full.view({-1}).slice(0, lora_width() * OC).view({lora_width(), OC});
      ops::linear_backward(Tensor(), dfull, Tensor(), t, dout, bw, /*dweight_accumulate=*/false);
      int64_t col = 0;
      for (size_t p = 0; p < lora_pieces.size(); ++p) {
        ops::copy_block(lora_b->grad, 0, col, dfull, static_cast<int64_t>(p) * r, col, r,
                        lora_pieces[p], add_b);
        col += lora_pieces[p];
      }
    }
    // (dt: a scratch of at least (N, P r), shared by layers of other widths)
    const int64_t N = dout.numel() / dout.size(-1);
    const Tensor d = dt.view({-1}).slice(0, N * lora_width()).view({N, lora_width()});
    ops::linear_forward(d, dout, bw, Tensor());
    ops::scale(d, lora_scale);
    if (!lora_drops(drop)) {
      ops::linear_backward(dinp, lora_a->grad, Tensor(), d, inp, lora_a->matmul_weight(),
                           lora_a->accumulate_grad());
      return;
    }
    const Tensor ain = lora_input(inp, drop);  // (the forward's mask again)
    // Through the dropout: g = d A (written), dinp += g * mask / (1 - p).
    LMF_CHECK(drop.g.defined() && drop.g.dtype() == DType::kF32 && drop.g.numel() >= inp.numel(),
              "LoRA dropout gradient scratch for an input {}", inp.shape().str());
    const Tensor g = drop.g.view({-1}).slice(0, inp.numel()).view(inp.shape());
    ops::linear_backward(g, lora_a->grad, Tensor(), d, ain, lora_a->matmul_weight(),
                         lora_a->accumulate_grad(), /*dinp_accumulate=*/false);
    ops::dropout_backward(dinp, g, lora_dropout, drop.key);
  }
};

}  // namespace lmforge
