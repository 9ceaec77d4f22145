// Global-norm gradient clipping (as torch.nn.utils.clip_grad_norm_): scales every gradient by
// min(1, max_norm / (norm + 1e-6)). Returns the norm before clipping. max_norm <= 0: no clip.
#pragma once

#include "lmforge/nn/params.h"

namespace lmforge {

double grad_norm(const ParamSet& params);
double clip_grad_norm(ParamSet& params, double max_norm);

}  // namespace lmforge
