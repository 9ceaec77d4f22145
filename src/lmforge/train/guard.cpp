#include "lmforge/train/guard.h"

#include <cmath>

namespace lmforge {

double SpikeGuard::Stat::zscore(double v, int64_t min_history) const {
  const int64_t n = static_cast<int64_t>(values.size());
  if (n < min_history || n < 2) return 0;
  double mean = 0;
  for (double x : values) mean += x;
  mean /= static_cast<double>(n);
  double var = 0;
  for (double x : values) var += (x - mean) * (x - mean);
  double sd = std::sqrt(var / static_cast<double>(n - 1));
  // A flat history (sd ~ 0) would make any wiggle infinite: floor sd at 1e-3 of the mean.
  sd = std::max(sd, 1e-3 * std::fabs(mean) + 1e-12);
  return (v - mean) / sd;
}

SpikeGuard::Verdict SpikeGuard::check(double loss, double grad_norm) {
  Verdict v = Verdict::kOk;
  last_z_ = 0;
  if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
    v = Verdict::kNonFinite;
  } else if (o_.zscore > 0) {
    last_z_ = loss_.zscore(loss, o_.min_history);
    if (last_z_ > o_.zscore) v = Verdict::kSpike;
  }
  if (v != Verdict::kOk) {
    ++skipped_;
    ++consecutive_;
    return v;
  }
  consecutive_ = 0;
  loss_.values.push_back(loss);
  while (static_cast<int64_t>(loss_.values.size()) > o_.window) loss_.values.pop_front();
  return v;
}

nlohmann::json SpikeGuard::state() const {
  return {{"loss", loss_.values}, {"skipped", skipped_}, {"consecutive", consecutive_}};
}

void SpikeGuard::set_state(const nlohmann::json& j) {
  if (j.is_null()) return;
  loss_.values = j.at("loss").get<std::deque<double>>();
  skipped_ = j.at("skipped").get<int64_t>();
  consecutive_ = j.at("consecutive").get<int64_t>();
}

const char* verdict_name(SpikeGuard::Verdict v) {
  switch (v) {
    case SpikeGuard::Verdict::kOk:
      return "ok";
    case SpikeGuard::Verdict::kNonFinite:
      return "non-finite";
    case SpikeGuard::Verdict::kSpike:
      return "spike";
  }
  return "?";
}

}  // namespace lmforge
