#include "lmforge/core/arena.h"

#include <cstring>

#include "lmforge/backend/cuda/runtime.h"

namespace lmforge {

namespace {
constexpr size_t kAlign = 64;
}

Arena::Arena(size_t bytes, Device device) : storage_(Storage::allocate(bytes, device)) {}

Arena Arena::planned(const std::function<void(Arena&)>& layout, Device device) {
  Arena measure = measuring();
  layout(measure);
  Arena real(measure.used(), device);
  layout(real);
  return real;
}

Tensor Arena::alloc(Shape shape, DType dtype) {
  size_t bytes = static_cast<size_t>(shape.numel()) * dtype_size(dtype);
  size_t offset = used_;
  used_ = (used_ + bytes + kAlign - 1) / kAlign * kAlign;
  if (!storage_) return Tensor(nullptr, offset, shape, dtype);
  LMF_CHECK(offset + bytes <= storage_->bytes(), "arena overflow: {} + {} of {} bytes", offset,
            bytes, storage_->bytes());
  return Tensor(storage_, offset, shape, dtype);
}

void Arena::zero_() const {
  if (!storage_ || !storage_->bytes()) return;
  if (storage_->device() == Device::kCUDA)
    cuda::memset_zero(storage_->data(), storage_->bytes());
  else
    std::memset(storage_->data(), 0, storage_->bytes());
}

Tensor Arena::as_tensor(DType dtype) const {
  return Tensor(storage_, 0, Shape{static_cast<int64_t>(used_ / dtype_size(dtype))}, dtype);
}

}  // namespace lmforge
