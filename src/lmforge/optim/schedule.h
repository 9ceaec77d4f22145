// Learning-rate schedules. step is 0-based (the step about to be taken); W = warmup, S = steps.
//   constant:  linear warmup (lr (s+1)/W for s < W), then lr
//   cosine:    warmup, then min_lr + (lr - min_lr) (1 + cos(pi p)) / 2, p = (s - W) / (S - W)
//   linear:    warmup, then lr + (min_lr - lr) p
//   wsd:       warmup-stable-decay: warmup, lr until the last decay_fraction of the steps, then
//              linear to min_lr over those (D = round(decay_fraction S) steps):
//              lr + (min_lr - lr) (s - (S - D) + 1) / D
//   one_cycle: fast.ai's fit_one_cycle: cosine from lr / div_factor up to lr over the first W
//              steps (W = 0: a quarter of the steps), then cosine down to min_lr at S
// cosine, linear and one_cycle reach min_lr at s = S, one step past the last (as PyTorch's
// schedulers with T_max = the decay steps); wsd's last step takes min_lr; constant stays at lr.
// docs/config.md lists the keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace lmforge {

struct Schedule {
  std::string kind = "cosine";  // constant | cosine | linear | wsd | one_cycle
  double lr = 3e-4;
  double min_lr = 3e-5;
  int64_t warmup = 0;
  int64_t steps = 1000;
  double decay_fraction = 0.2;  // wsd: share of the steps spent decaying
  double div_factor = 25;       // one_cycle: the first step's lr is lr / div_factor
  // Throws Error naming train.schedule (or the offending key) for an unknown kind or bad values.
  void validate() const;
  double at(int64_t step) const;
  // wsd: the steps of its decay, D = round(decay_fraction S), at least 1.
  int64_t decay_steps() const {
    return std::max<int64_t>(1, std::llround(decay_fraction * static_cast<double>(steps)));
  }
};

}  // namespace lmforge
