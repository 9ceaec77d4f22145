// Global-norm gradient clipping (as torch.nn.utils.clip_grad_norm_): every gradient is scaled by
// min(1, max_norm / (norm + 1e-6)). The scaling happens inside the optimizer's update
// (AdamW::step's grad_scale), not as a pass of its own over the gradients:
//
//   opt.step(lr, clip_coef(grad_norm(params), max_norm));
#pragma once

#include "lmforge/nn/params.h"

namespace lmforge {

double grad_norm(const ParamSet& params);
// The factor for the gradients: min(1, max_norm / (norm + 1e-6)); 1 when max_norm <= 0 (no
// clipping) or the norm is not finite (the step is skipped or fails elsewhere).
double clip_coef(double norm, double max_norm);

}  // namespace lmforge
