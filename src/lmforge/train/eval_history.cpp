// EvalHistory (trainer.h): the validation losses so far, the best and early stopping's count.
#include <cmath>
#include <nlohmann/json.hpp>

#include "lmforge/train/trainer.h"

namespace lmforge {

using nlohmann::json;

json EvalHistory::state() const {
  return {{"best", best_step_ < 0 ? json(nullptr) : json(best_)},
          {"best_step", best_step_},
          {"bad", bad_},
          {"reference", best_step_ < 0 ? json(nullptr) : json(reference_)}};
}

EvalHistory::EvalHistory(const json& j) {
  if (j.is_null()) return;
  best_step_ = j.at("best_step").get<int64_t>();
  bad_ = j.at("bad").get<int64_t>();
  if (best_step_ >= 0) best_ = j.at("best").get<double>();
  // (saved before the two differed: the best was the reference)
  const json ref = j.value("reference", json());
  reference_ = ref.is_number() ? ref.get<double>() : best_;
}

bool EvalHistory::add(int64_t step, double val_loss, double min_delta) {
  // A non-finite loss never becomes the best (nothing would ever beat a NaN, and JSON cannot
  // hold it): it counts as an evaluation without improvement.
  if (!std::isfinite(val_loss)) {
    ++bad_;
    return false;
  }
  const bool first = best_step_ < 0;
  if (first || val_loss < reference_ - min_delta) {
    reference_ = val_loss;
    bad_ = 0;
  } else {
    ++bad_;
  }
  if (!first && val_loss >= best_) return false;
  best_ = val_loss;
  best_step_ = step;
  return true;
}

}  // namespace lmforge
