#include "lmforge/optim/adamw.h"

#include "lmforge/backend/ops.h"

namespace lmforge {

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
  state_ = Arena::planned(
      [&](Arena& a) {
        m_.clear();
        v_.clear();
        for (const OptSlot& s : slots_) {
          Shape shape = s.whole() ? s.param->shape : Shape{s.len};
          m_.push_back(a.alloc(shape, DType::kF32));
          v_.push_back(a.alloc(shape, DType::kF32));
        }
      },
      device);
}

void AdamW::step(double lr, double grad_scale) {
  ++t_;
  bool refreshed = true, masters = false;
  std::vector<ops::AdamwItem>& items = items_;
  items.clear();
  for (size_t i = 0; i < slots_.size(); ++i) {
    const OptSlot& s = slots_[i];
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
  // All slots at once (one launch on a GPU).
  ops::adamw_update_all(items, lr, opt_.beta1, opt_.beta2, opt_.eps, opt_.weight_decay, t_,
                        grad_scale, opt_.seed);
  if (masters)
    params_.invalidate_bf16();
  else if (params_.has_bf16() && refreshed)
    params_.bf16_refreshed();
}

}  // namespace lmforge
