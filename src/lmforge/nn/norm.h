// Norm layer: LayerNorm (weight, optional bias) or RMSNorm (weight only) over the last dim.
#pragma once

#include <string>

#include "lmforge/backend/ops.h"
#include "lmforge/nn/params.h"

namespace lmforge {

struct Norm {
  bool rms = false;
  double eps = 1e-5;
  double offset = 0;  // RMSNorm scales by offset + weight (ModelConfig::norm_offset)
  Param* weight = nullptr;
  Param* bias = nullptr;

  struct Saved {  // per-row statistics kept for backward
    Tensor mean;  // (N) LayerNorm only
    Tensor rstd;  // (N)
  };

  void declare(ParamSet& ps, const std::string& name, int64_t C, bool rmsnorm, double epsilon,
               bool has_bias, double weight_offset = 0) {
    rms = rmsnorm;
    eps = epsilon;
    offset = weight_offset;
    weight = ps.add(name + ".weight", {C}, false);
    bias = (!rms && has_bias) ? ps.add(name + ".bias", {C}, false) : nullptr;
  }
  void plan(Arena& a, Saved& s, int64_t N) const {
    if (!rms) s.mean = a.alloc({N});
    s.rstd = a.alloc({N});
  }
  void forward(const Tensor& out, const Saved& s, const Tensor& inp) const {
    if (rms)
      ops::rmsnorm_forward(out, s.rstd, inp, weight->fp32(), eps, offset);
    else
      ops::layernorm_forward(out, s.mean, s.rstd, inp, weight->fp32(),
                             bias ? bias->fp32() : Tensor(), eps);
  }
  // dinp += ; the weight and bias gradients += unless frozen (LoRA).
  void backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, const Saved& s) const {
    const Tensor dw = weight->frozen ? Tensor() : weight->grad;
    if (rms)
      ops::rmsnorm_backward(dinp, dw, dout, inp, weight->fp32(), s.rstd, offset);
    else
      ops::layernorm_backward(dinp, dw, bias && !bias->frozen ? bias->grad : Tensor(), dout, inp,
                              weight->fp32(), s.mean, s.rstd);
  }
};

}  // namespace lmforge
