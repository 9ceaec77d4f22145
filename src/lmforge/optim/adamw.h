// AdamW (Loshchilov & Hutter 2019) over a ParamSet, matching torch.optim.AdamW. Weight decay
// applies only to parameters with decay=true (matrices; not norms, biases or embeddings).
// Moments live in one buffer laid out like the parameters; checkpoints save them by name.
//
//   AdamW opt(model.params(), {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
//   opt.step(lr);
#pragma once

#include <vector>

#include "lmforge/nn/params.h"

namespace lmforge {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  AdamW(ParamSet& params, const AdamWOptions& opt);
  void step(double lr);
  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }
  // First and second moments of params()[i].
  const Tensor& m(size_t i) const { return m_[i]; }
  const Tensor& v(size_t i) const { return v_[i]; }

 private:
  ParamSet& params_;
  AdamWOptions opt_;
  Arena state_;
  std::vector<Tensor> m_, v_;
  int64_t t_ = 0;
};

}  // namespace lmforge
