// Knowledge distillation over a vocabulary split by columns (tensor parallelism): what each
// rank's columns of a row contribute (ops::softmax_distill_stats) and how every rank's
// contributions make the row's loss (ops::softmax_distill_parallel), shared by the CPU and CUDA
// kernels so both combine alike.
//
// Per row and rank, over its columns of the student's logits s and the teacher's t, at
// temperature T (kDistillStats doubles):
//   0 lse_x  log sum exp(s)          2 lse_q  log sum exp(t / T)
//   1 lse_u  log sum exp(s / T)      3 w      sum exp(t / T - lse_q) (t - s) / T
//   4 the target's logit where the target is among the columns, else 0
// (zeros for ignored rows). Over all the ranks' columns, with q = softmax(t / T) and
// p^T = softmax(s / T): KL(q || p^T) = sum q (t - s) / T - lse_q + lse_u, where the first term is
// the ranks' w weighted by exp(lse_q(rank) - lse_q).
#pragma once

#include <cmath>
#include <cstdint>

#include "lmforge/core/stochastic_round.h"  // LMF_HD

namespace lmforge {

constexpr int64_t kDistillStats = 5;

struct DistillRow {
  double lse, lse_u, lse_q, ce, kl;  // over the whole vocabulary
};

// Row i's totals from every rank's statistics (all: P x N x kDistillStats, rank order).
LMF_HD DistillRow distill_combine(const double* all, int64_t P, int64_t N, int64_t i) {
  double mx = -INFINITY, mu = -INFINITY, mq = -INFINITY, xy = 0;
  for (int64_t k = 0; k < P; ++k) {
    const double* st = all + (k * N + i) * kDistillStats;
    mx = fmax(mx, st[0]);
    mu = fmax(mu, st[1]);
    mq = fmax(mq, st[2]);
    xy += st[4];
  }
  double sx = 0, su = 0, sq = 0, w = 0;
  for (int64_t k = 0; k < P; ++k) {
    const double* st = all + (k * N + i) * kDistillStats;
    const double eq = exp(st[2] - mq);
    sx += exp(st[0] - mx);
    su += exp(st[1] - mu);
    sq += eq;
    w += st[3] * eq;
  }
  DistillRow r;
  r.lse = mx + log(sx);
  r.lse_u = mu + log(su);
  r.lse_q = mq + log(sq);
  r.ce = r.lse - xy;
  r.kl = w / sq - r.lse_q + r.lse_u;
  return r;
}

}  // namespace lmforge
