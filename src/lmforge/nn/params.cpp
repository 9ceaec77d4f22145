#include "lmforge/nn/params.h"

#include "lmforge/backend/ops.h"

namespace lmforge {

Param* ParamSet::add(const std::string& name, Shape shape, bool decay) {
  LMF_CHECK(find(name) == nullptr, "duplicate parameter {}", name);
  params_.push_back(Param{name, shape, decay, {}, {}, false, {}, 0});
  return &params_.back();
}

void ParamSet::finalize(DType dtype) {
  dtype_ = dtype;
  allocate_values();
  allocate_grads();
  for (Param& p : params_)
    p.flat_offset = static_cast<int64_t>(p.grad.byte_offset() / dtype_size(dtype_));
  flat_size_ = static_cast<int64_t>(grads_.used() / dtype_size(dtype_));
}

void ParamSet::allocate_grads() {
  grads_ = Arena::planned(
      [&](Arena& a) {
        for (Param& p : params_) p.grad = a.alloc(p.shape, dtype_);
      },
      device_);
}

void ParamSet::to(Device device) {
  if (device == device_) return;
  // The old buffers stay alive through these views until the copies are made.
  Tensor values = has_values() ? flat_values() : Tensor();
  Tensor grads = grads_.capacity() ? flat_grads() : Tensor();
  // External copies (full-shard's) point at the owner's buffers on the old device: the moved
  // set makes copies of its own instead.
  const bool bf16 = has_bf16();
  device_ = device;
  if (values.defined()) {
    allocate_values();
    flat_values().copy_from(values);
  }
  if (grads.defined()) {
    allocate_grads();
    flat_grads().copy_from(grads);
  }
  if (bf16) {
    bf16_ = Arena();
    for (Param& p : params_) p.value_bf16 = Tensor();
    if (values.defined()) enable_bf16();
  }
}

void ParamSet::release_grads() {
  for (Param& p : params_) p.grad = Tensor();
  grads_ = Arena();
}

void ParamSet::allocate_values() {
  values_ = Arena::planned(
      [&](Arena& a) {
        for (Param& p : params_) p.value = a.alloc(p.shape, dtype_);
      },
      device_);
}

void ParamSet::enable_bf16() {
  LMF_CHECK(dtype_ == DType::kF32 && values_.capacity() > 0, "enable_bf16 needs fp32 parameters");
  if (bf16_.capacity() > 0) return;
  bf16_external_ = false;
  bf16_ = Arena::planned(
      [&](Arena& a) {
        for (Param& p : params_)
          if (p.matmul) p.value_bf16 = a.alloc(p.shape, DType::kBF16);
      },
      device_);
  bf16_fresh_ = false;
}

void ParamSet::use_external_bf16() {
  bf16_ = Arena();
  for (Param& p : params_) p.value_bf16 = Tensor();
  bf16_external_ = true;
}

void ParamSet::sync_bf16() {
  if (bf16_.capacity() == 0 || bf16_fresh_) return;
  for (Param& p : params_)
    if (p.value_bf16.defined()) ops::to_bf16(p.value_bf16, p.value);
  bf16_fresh_ = true;
}

void ParamSet::release_values() {
  LMF_CHECK(bf16_.capacity() == 0, "release_values with bf16 copies");
  for (Param& p : params_) p.value = Tensor();
  values_ = Arena();
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
