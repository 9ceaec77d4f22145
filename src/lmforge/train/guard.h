// The spike and NaN guard: decides, after a step's forward/backward, whether its update is
// applied. A step is skipped when its loss or gradient norm is not finite, or when its loss is an
// outlier: more than `zscore` standard deviations above the mean of the last `window` accepted
// steps (once at least `min_history` are known). The gradient norm is not z-scored: its
// heavy-tailed fluctuations early in training would skip healthy steps (and clipping bounds it).
// Only accepted steps enter the statistics, so a NaN or a spike never poisons them. The state is
// part of the checkpoint (bit-exact resume).
//
//   SpikeGuard guard({6.0, 100});
//   auto v = guard.check(loss, grad_norm);
//   if (v == SpikeGuard::Verdict::kOk) opt.step(lr);
//   if (guard.consecutive() > max_skips) fail(...);
#pragma once

#include <cstdint>
#include <deque>
#include <nlohmann/json.hpp>

namespace lmforge {

class SpikeGuard {
 public:
  struct Options {
    double zscore = 6;  // 0 = only non-finite values are skipped
    int64_t window = 100;
    int64_t min_history = 20;
  };
  enum class Verdict { kOk, kNonFinite, kSpike };

  explicit SpikeGuard(Options o) : o_(o) {}
  Verdict check(double loss, double grad_norm);
  int64_t skipped() const { return skipped_; }          // in total
  int64_t consecutive() const { return consecutive_; }  // skipped in a row, up to now
  double last_zscore() const { return last_z_; }        // the loss's, at the last check

  nlohmann::json state() const;
  void set_state(const nlohmann::json& j);

 private:
  struct Stat {
    std::deque<double> values;
    double zscore(double v, int64_t min_history) const;
  };
  Options o_;
  Stat loss_;
  int64_t skipped_ = 0, consecutive_ = 0;
  double last_z_ = 0;
};

const char* verdict_name(SpikeGuard::Verdict v);

}  // namespace lmforge
