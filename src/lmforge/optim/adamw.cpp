#include "lmforge/optim/adamw.h"

#include "lmforge/backend/ops.h"

namespace lmforge {

AdamW::AdamW(ParamSet& params, const AdamWOptions& opt) : params_(params), opt_(opt) {
  state_ = Arena::planned([&](Arena& a) {
    m_.clear();
    v_.clear();
    for (const Param& p : params_.params()) {
      m_.push_back(a.alloc(p.shape, DType::kF32));
      v_.push_back(a.alloc(p.shape, DType::kF32));
    }
  });
}

void AdamW::step(double lr) {
  ++t_;
  size_t i = 0;
  for (Param& p : params_.params()) {
    ops::adamw_update(p.value, p.grad, m_[i], v_[i], lr, opt_.beta1, opt_.beta2, opt_.eps,
                      p.decay ? opt_.weight_decay : 0.0, t_, p.value_bf16);
    ++i;
  }
  if (params_.has_bf16()) params_.bf16_refreshed();
}

}  // namespace lmforge
