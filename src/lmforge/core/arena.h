// Arena: one allocation, carved into tensors by bumping an offset. Plans are made twice with the
// same code: once on a measuring arena (no memory, just sums sizes), then on a real one of that
// size. A training step then reuses the same tensors and allocates nothing.
//
//   auto layout = [&](Arena& a) { x = a.alloc({B, T, C}); h = a.alloc({B, T, 4 * C}); };
//   Arena arena = Arena::planned(layout);
#pragma once

#include <functional>

#include "lmforge/core/tensor.h"

namespace lmforge {

class Arena {
 public:
  Arena() = default;
  // A measuring arena: alloc() returns storage-less tensors and only sums the bytes.
  static Arena measuring() { return Arena(); }
  explicit Arena(size_t bytes, Device device = Device::kCPU);

  // Runs `layout` on a measuring arena, then on a real arena of the measured size.
  static Arena planned(const std::function<void(Arena&)>& layout, Device device = Device::kCPU);

  Tensor alloc(Shape shape, DType dtype = DType::kF32);
  size_t used() const { return used_; }
  size_t capacity() const { return storage_ ? storage_->bytes() : 0; }
  void zero_() const;                   // zero the whole arena (e.g. gradient buffers)
  Tensor as_tensor(DType dtype) const;  // the used part as one flat tensor

 private:
  std::shared_ptr<Storage> storage_;
  size_t used_ = 0;
};

}  // namespace lmforge
