// Linear layer: out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC). Weight layout matches
// torch.nn.Linear, so HF checkpoints map without transposes.
#pragma once

#include <string>

#include "lmforge/backend/ops.h"
#include "lmforge/nn/params.h"

namespace lmforge {

struct Linear {
  Param* weight = nullptr;
  Param* bias = nullptr;

  void declare(ParamSet& ps, const std::string& name, int64_t in, int64_t out, bool has_bias) {
    weight = ps.add(name + ".weight", {out, in}, true);
    weight->matmul = true;
    bias = has_bias ? ps.add(name + ".bias", {out}, false) : nullptr;
  }
  void forward(const Tensor& out, const Tensor& inp) const {
    ops::linear_forward(out, inp, weight->matmul_weight(), bias ? bias->fp32() : Tensor());
  }
  // dinp, weight.grad and bias.grad +=
  void backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) const {
    ops::linear_backward(dinp, weight->grad, bias ? bias->grad : Tensor(), dout, inp,
                         weight->matmul_weight());
  }
};

}  // namespace lmforge
