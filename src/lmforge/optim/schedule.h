// Learning-rate schedules. step is 0-based (the step about to be taken).
//   constant: lr
//   cosine:   linear warmup to lr over `warmup` steps, then cosine decay to min_lr at `steps`
//   linear:   linear warmup, then linear decay to min_lr at `steps`
#pragma once

#include <cstdint>
#include <string>

namespace lmforge {

struct Schedule {
  std::string kind = "cosine";
  double lr = 3e-4;
  double min_lr = 3e-5;
  int64_t warmup = 0;
  int64_t steps = 1000;
  double at(int64_t step) const;
};

}  // namespace lmforge
