// lmforge lr-find: the learning-rate range test over a training config.
#pragma once

#include <cstdint>
#include <vector>

#include "lmforge/io/config.h"

namespace lmforge {

// The learning-rate range test (Smith 2017; fast.ai's lr_find): from the initial weights, one
// AdamW step per LR on an exponential sweep from start to end, recording the loss; stops early
// once the smoothed loss exceeds 4x its minimum. The run directory is not touched.
struct LrFindOptions {
  double start = 1e-7, end = 10;
  int64_t steps = 100;
};
struct LrFindResult {
  std::vector<double> lrs, losses, smoothed;
  double suggested = 0;    // steepest descent of the smoothed loss, before its minimum
  double min_over_10 = 0;  // the LR at the smoothed minimum, divided by 10 (fast.ai's other rule)
};
LrFindResult lr_find(Config& cfg, const LrFindOptions& o);

}  // namespace lmforge
