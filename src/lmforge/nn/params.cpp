#include "lmforge/nn/params.h"

namespace lmforge {

Param* ParamSet::add(const std::string& name, Shape shape, bool decay) {
  LMF_CHECK(find(name) == nullptr, "duplicate parameter {}", name);
  params_.push_back(Param{name, shape, decay, {}, {}});
  return &params_.back();
}

void ParamSet::finalize(DType dtype) {
  dtype_ = dtype;
  auto layout = [&](Arena& a, bool grad) {
    for (Param& p : params_) (grad ? p.grad : p.value) = a.alloc(p.shape, dtype);
  };
  values_ = Arena::planned([&](Arena& a) { layout(a, false); });
  grads_ = Arena::planned([&](Arena& a) { layout(a, true); });
}

Param* ParamSet::find(const std::string& name) {
  for (Param& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

int64_t ParamSet::numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.shape.numel();
  return n;
}

}  // namespace lmforge
