#include "lmforge/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "lmforge/backend/ops.h"

namespace lmforge {

bool muon_param(const Param& p) {
  return p.shape.ndim() == 2 && !p.frozen && p.name.starts_with("blocks.");
}

std::vector<OptSlot> whole_slots(ParamSet& ps) {
  std::vector<OptSlot> out;
  for (Param& p : ps.params())
    if (!p.frozen) out.push_back({&p, 0, p.shape.numel(), p.value, p.grad, p.value_bf16});
  return out;
}

AdamW::AdamW(ParamSet& params, const AdamWOptions& opt) : AdamW(params, whole_slots(params), opt) {}

AdamW::AdamW(ParamSet& params, std::vector<OptSlot> slots, const AdamWOptions& opt)
    : params_(params), opt_(opt), slots_(std::move(slots)) {
  // The moments live where the slots' values do (the GPU; the host under dist.offload).
  const Device device = slots_.empty() ? Device::kCPU : slots_[0].value.device();
  int64_t most = 0, most_gram = 0;  // Muon's largest matrix and Gram matrix, in elements
  for (const OptSlot& s : slots_) {
    if (!opt_.muon.on || !muon_param(*s.param)) continue;
    LMF_CHECK(s.whole() && s.value.dtype() == DType::kF32,
              "Muon steps whole fp32 matrices, but {} is a {} slot of {} elements", s.param->name,
              dtype_name(s.value.dtype()), s.len);
    const int64_t side = std::min(s.param->shape[0], s.param->shape[1]);
    most = std::max(most, s.len);
    most_gram = std::max(most_gram, side * side);
  }
  state_ = Arena::planned(
      [&](Arena& a) {
        m_.clear();
        v_.clear();
        for (const OptSlot& s : slots_) {
          Shape shape = s.whole() ? s.param->shape : Shape{s.len};
          m_.push_back(a.alloc(shape, DType::kF32));
          const bool muon = opt_.muon.on && muon_param(*s.param);  // no second moment
          v_.push_back(muon ? Tensor() : a.alloc(shape, DType::kF32));
        }
        if (most == 0) return;
        ns_x_ = a.alloc({most});
        ns_next_ = a.alloc({most});
        ns_gram_ = a.alloc({most_gram});
        ns_poly_ = a.alloc({most_gram});
        if (!opt_.muon.bf16) return;
        ns_x16_ = a.alloc({most}, DType::kBF16);
        ns_gram16_ = a.alloc({most_gram}, DType::kBF16);
        ns_poly16_ = a.alloc({most_gram}, DType::kBF16);
      },
      device);
}

// torch.optim.Muon's step for one matrix W (R, C) with gradient g:
//   buf = mu buf + (1 - mu) g;  u = nesterov ? (1 - mu) g + mu buf : buf;
//   X = u / max(|u|_F, eps), then ns_steps times (the wide orientation; a tall X iterates on
//   X^T X from the right, which is the same as torch's transposing it):
//     A = X X^T;  X = a X + (b A + c A^2) X;
//   W = (1 - lr wd) W - lr_adj X.
void AdamW::muon_step(size_t i, double lr, double grad_scale) {
  const OptSlot& s = slots_[i];
  const MuonOptions& mo = opt_.muon;
  const int64_t R = s.param->shape[0], C = s.param->shape[1], k = std::min(R, C);
  const bool tall = R > C;
  const Tensor g = s.grad.view({R, C}), buf = m_[i].view({R, C}), w = s.value.view({R, C});
  Tensor x = ns_x_.slice(0, R * C).view({R, C}), next = ns_next_.slice(0, R * C).view({R, C});
  const Tensor gram = ns_gram_.slice(0, k * k).view({k, k});
  const Tensor poly = ns_poly_.slice(0, k * k).view({k, k});
  // A product's weight operand: itself, or its bf16 copy (which selects the bf16 matmul); with
  // convert false only its shape is used.
  auto weight = [&](const Tensor& t, const Tensor& buf16, bool convert = true) {
    if (!mo.bf16) return t;
    Tensor w16 = buf16.slice(0, t.numel()).view(t.shape());
    if (convert) ops::to_bf16(w16, t);
    return w16;
  };

  ops::axpby(buf, mo.momentum, g, (1 - mo.momentum) * grad_scale);
  x.copy_from(buf);
  if (mo.nesterov) ops::axpby(x, mo.momentum, g, (1 - mo.momentum) * grad_scale);
  ops::scale(x, 1.0 / std::max(std::sqrt(ops::sum_squares(x)), mo.eps));
  for (int it = 0; it < mo.ns_steps; ++it) {
    const Tensor xw = tall ? Tensor() : weight(x, ns_x16_);  // (wide: X is a weight twice)
    // gram = X^T X (tall: a weight gradient's product) or X X^T (wide).
    if (tall)
      ops::linear_backward({}, gram, {}, x, x, weight(gram, ns_gram16_, /*convert=*/false),
                           /*dweight_accumulate=*/false);
    else
      ops::linear_forward(gram, x, xw, {});
    // gram gram^T = gram^2 (symmetric)
    ops::linear_forward(poly, gram, weight(gram, ns_gram16_), {});
    ops::axpby(poly, mo.c, gram, mo.b);  // b gram + c gram^2, symmetric too
    if (tall)
      ops::linear_forward(next, x, weight(poly, ns_poly16_), {});  // X poly^T = X poly
    else  // poly X, as an input gradient (dout poly, weight X)
      ops::linear_backward(next, {}, {}, poly, /*inp: its shape only*/ next, xw,
                           /*dweight_accumulate=*/true, /*dinp_accumulate=*/false);
    ops::axpby(next, 1.0, x, mo.a);
    std::swap(x, next);
  }
  const double muon_lr = lr * mo.lr_ratio;
  const double ratio = mo.match_rms_adamw ? 0.2 * std::sqrt(static_cast<double>(std::max(R, C)))
                                          : std::sqrt(std::max(1.0, static_cast<double>(R) / C));
  const double wd = s.param->decay ? opt_.weight_decay : 0.0;
  ops::axpby(w, 1 - muon_lr * wd, x, -muon_lr * ratio);
}

void AdamW::step(double lr, double grad_scale) {
  ++t_;
  bool refreshed = true, masters = false;
  std::vector<ops::AdamwItem>& items = items_;
  items.clear();
  for (size_t i = 0; i < slots_.size(); ++i) {
    const OptSlot& s = slots_[i];
    if (!v_[i].defined()) {  // Muon: its bf16 copy converted after the update, when beside it
      muon_step(i, lr, grad_scale);
      const Tensor& bf16 = s.param->value_bf16;
      if (bf16.defined() && s.value.raw() == s.param->value.raw())
        ops::to_bf16(bf16, s.value.view(s.param->shape));
      else
        refreshed = refreshed && !bf16.defined();
      continue;
    }
    // bf16 master weights are their own bf16 copies, rounded stochastically by the update; their
    // fp32 working copies (1-D parameters) are refreshed before the next forward.
    const bool master16 = s.value.dtype() == DType::kBF16;
    LMF_CHECK(!s.param->value.defined() || s.param->value.dtype() == s.value.dtype(),
              "AdamW over {} was made before ParamSet::use_bf16_master; make it after",
              s.param->name);
    masters = masters || master16;
    // A whole parameter's bf16 copy may be enabled after the optimizer was made; it is written
    // here only where it lives beside the slot (not from dist.offload's host copy of a GPU
    // model: those copies are reconverted on use).
    const Tensor& bf16 = master16 ? Tensor() : s.whole() ? s.param->value_bf16 : s.value_bf16;
    const bool beside = bf16.defined() && bf16.device() == s.value.device();
    refreshed = refreshed && (beside || !bf16.defined());
    items.push_back({s.value, s.grad, m_[i], v_[i], beside ? bf16 : Tensor(), s.param->decay,
                     params_.offset(*s.param) + s.begin});
  }
  // All AdamW slots at once (one launch on a GPU).
  if (!items.empty())
    ops::adamw_update_all(items, lr, opt_.beta1, opt_.beta2, opt_.eps, opt_.weight_decay, t_,
                          grad_scale, opt_.seed);
  if (masters)
    params_.invalidate_bf16();
  else if (params_.has_bf16() && refreshed)
    params_.bf16_refreshed();
}

}  // namespace lmforge
