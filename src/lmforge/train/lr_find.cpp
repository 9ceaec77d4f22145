// The learning-rate range test (lmforge lr-find): see lr_find.h.
#include "lmforge/train/lr_find.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/data/loader.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/train/objective.h"
#include "lmforge/train/trainer.h"

namespace lmforge {

LrFindResult lr_find(Config& cfg, const LrFindOptions& o) {
  if (!(o.start > 0 && o.end > o.start) || !std::isfinite(o.end))
    fail("lr-find: need 0 < --start < --end, both finite (got {} and {})", o.start, o.end);
  if (o.steps < 5) fail("lr-find: --steps must be at least 5, got {}", o.steps);
  if (preference_objective(cfg.train.objective))
    fail(
        "lr-find: sweeps the next-token loss, not train.objective {}; run it with "
        "train.objective: clm (e.g. on the SFT data)",
        cfg.train.objective);
  RunSetup setup = setup_run(cfg);
  const TrainConfig& t = cfg.train;
  Transformer& model = *setup.model;
  dist::LocalCommunicator one;
  dist::DataParallel dp(one, model, cfg.dist, optimizer_options(cfg), setup.values);
  std::vector<Batch> micro(t.grad_accum);
  for (Batch& b : micro) b = Batch::make(t.batch_size, t.seq_len);
  model.set_z_loss(t.z_loss);
  LrFindResult r;
  // Smoothed as fast.ai does: an exponential moving average with bias correction.
  const double beta = 0.98;
  double avg = 0, best = INFINITY;
  for (int64_t i = 0; i < o.steps; ++i) {
    double lr = o.start * std::pow(o.end / o.start, static_cast<double>(i) / (o.steps - 1));
    for (Batch& b : micro) setup.train_data->next(b);
    double loss = dp.forward_backward(micro);
    dp.clip_grad_norm(t.grad_clip);
    dp.step(lr);
    avg = beta * avg + (1 - beta) * loss;
    double smooth = avg / (1 - std::pow(beta, static_cast<double>(i + 1)));
    r.lrs.push_back(lr);
    r.losses.push_back(loss);
    r.smoothed.push_back(smooth);
    fmt::print("lr-find {:>4}/{} | lr {:.3e} | loss {:.4f} | smoothed {:.4f}\n", i + 1, o.steps, lr,
               loss, smooth);
    std::fflush(stdout);
    if (!std::isfinite(smooth) || (i > 10 && smooth > 4 * best)) break;
    best = std::min(best, smooth);
  }
  // Rule: the LR where the smoothed loss falls fastest per unit of log(lr), looking only up to
  // the smoothed minimum (past it the loss is diverging).
  size_t n = r.smoothed.size(), at_min = 0;
  for (size_t i = 0; i < n; ++i)
    if (std::isfinite(r.smoothed[i]) && r.smoothed[i] < r.smoothed[at_min]) at_min = i;
  double steepest = INFINITY;
  r.suggested = r.lrs[at_min];
  for (size_t i = 1; i <= at_min; ++i) {
    double slope = (r.smoothed[i] - r.smoothed[i - 1]) / std::log(r.lrs[i] / r.lrs[i - 1]);
    if (slope < steepest) {
      steepest = slope;
      r.suggested = r.lrs[i];
    }
  }
  r.min_over_10 = r.lrs[at_min] / 10;
  return r;
}

}  // namespace lmforge
