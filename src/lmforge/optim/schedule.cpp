#include "lmforge/optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "lmforge/core/error.h"

namespace lmforge {

double Schedule::at(int64_t step) const {
  if (kind == "constant") return lr;
  if (step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  double span = static_cast<double>(std::max<int64_t>(1, steps - warmup));
  double progress = std::clamp(static_cast<double>(step - warmup) / span, 0.0, 1.0);
  if (kind == "cosine") return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
  if (kind == "linear") return lr + (min_lr - lr) * progress;
  fail("train.schedule: unknown schedule \"{}\"; expected cosine, linear or constant", kind);
}

}  // namespace lmforge
