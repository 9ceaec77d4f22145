#include "lmforge/optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {

// Cosine from a (p = 0) to b (p = 1).
double cosine(double a, double b, double p) {
  return b + 0.5 * (a - b) * (1.0 + std::cos(M_PI * std::clamp(p, 0.0, 1.0)));
}

}  // namespace

void Schedule::validate() const {
  if (kind != "constant" && kind != "cosine" && kind != "linear" && kind != "wsd" &&
      kind != "one_cycle")
    fail(
        "train.schedule: unknown schedule \"{}\"; expected constant, cosine, linear, wsd or "
        "one_cycle",
        kind);
  if (!(lr > 0) || !std::isfinite(lr)) fail("train.lr: must be positive, got {}", lr);
  if (warmup < 0) fail("train.warmup: must be >= 0, got {}", warmup);
  if (min_lr < 0) fail("train.min_lr: must be >= 0, got {}", min_lr);
  if (kind != "constant" && min_lr > lr)  // the decay would rise
    fail(
        "train.min_lr: {} is above train.lr {}, the peak the schedule decays from; lower it, or "
        "leave it unset for train.lr / 10",
        min_lr, lr);
  if (!(decay_fraction > 0 && decay_fraction <= 1))
    fail("train.decay_fraction: must be in (0, 1], got {}", decay_fraction);
  if (kind == "wsd" && warmup > steps - decay_steps())
    fail(
        "train.warmup: {} steps run into wsd's decay (its last {} of {} steps, "
        "train.decay_fraction {}); shorten the warmup or the decay",
        warmup, decay_steps(), steps, decay_fraction);
  if (!(div_factor >= 1)) fail("train.div_factor: must be >= 1, got {}", div_factor);
}

double Schedule::at(int64_t step) const {
  const double s = static_cast<double>(step);
  if (kind == "one_cycle") {
    int64_t up = warmup > 0 ? warmup : std::max<int64_t>(1, steps / 4);
    if (step < up) return cosine(lr / div_factor, lr, s / static_cast<double>(up));
    return cosine(
        lr, min_lr,
        (s - static_cast<double>(up)) / static_cast<double>(std::max<int64_t>(1, steps - up)));
  }
  if (step < warmup) return lr * (s + 1) / static_cast<double>(warmup);
  if (kind == "constant") return lr;
  if (kind == "wsd") {
    const int64_t decay = decay_steps(), start = steps - decay;
    if (step < start) return lr;
    double p = std::min(1.0, (s - static_cast<double>(start) + 1) / static_cast<double>(decay));
    return lr + (min_lr - lr) * p;
  }
  double span = static_cast<double>(std::max<int64_t>(1, steps - warmup));
  double progress = std::clamp((s - static_cast<double>(warmup)) / span, 0.0, 1.0);
  if (kind == "cosine") return cosine(lr, min_lr, progress);
  if (kind == "linear") return lr + (min_lr - lr) * progress;
  validate();  // throws for an unknown kind
  return lr;
}

}  // namespace lmforge
