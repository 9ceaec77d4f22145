// Tensor: a typed, shaped view over shared storage. Contiguous row-major views are the norm;
// views (reshape, slice along the first dimension) share the storage and never copy.
//
//   Tensor x = Tensor::empty({B, T, C}, DType::kF32);   // owns fresh storage (setup code only)
//   Tensor rows = x.view({B * T, C});                      // same storage
//   float* p = rows.data<float>();
//
// Inside a training step tensors come from an Arena (core/arena.h), never from Tensor::empty.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "lmforge/core/dtype.h"
#include "lmforge/core/error.h"

namespace lmforge {

// Throws Error "out of memory: <what> need X GiB but Y GiB is available; <fix>" when `bytes`
// exceed the available host memory. Linux accepts mappings larger than memory and kills the
// process when they are touched: callers that know a whole footprint ask first.
// `processes`: the node's processes (ranks) that `bytes` is the total of, each checked against its
// own address-space limit.
void check_host_memory(double bytes, const std::string& what, const std::string& fix,
                       int processes = 1);
// Host memory the node's processes may still take, in bytes (0 when unknown): the lesser of
// MemAvailable and what is left of this process's cgroup's memory.max.
size_t available_host_memory();
// What is left of this process's ulimit -v, in bytes (SIZE_MAX without one).
size_t process_address_room();
// What an out-of-memory error suggests (the command's knobs); each subcommand sets its own, the
// default says to free memory.
void set_oom_hint(std::string hint);
const std::string& oom_hint();

// Raw memory for tensors; owned (freed on destruction) or borrowed (e.g. an mmap'ed file).
class Storage {
 public:
  static std::shared_ptr<Storage> allocate(size_t bytes, Device device = Device::kCPU);
  // Memory owned elsewhere; `keepalive` (e.g. an mmap holder) lives as long as the storage.
  static std::shared_ptr<Storage> borrow(void* data, size_t bytes,
                                         std::shared_ptr<void> keepalive = nullptr,
                                         Device device = Device::kCPU);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  Storage(void* data, size_t bytes, Device device, bool owned)
      : data_(data), bytes_(bytes), device_(device), owned_(owned) {}
  void* data_;
  size_t bytes_;
  Device device_;
  bool owned_;
  size_t mapped_ = 0;  // bytes of an mmap'ed allocation (0: heap)
  std::shared_ptr<void> keepalive_;
};

constexpr int kMaxDims = 6;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  int ndim() const { return ndim_; }
  int64_t operator[](int i) const { return dims_[i < 0 ? i + ndim_ : i]; }
  int64_t& operator[](int i) { return dims_[i < 0 ? i + ndim_ : i]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "(2, 3, 4)"
  static Shape of(const int64_t* dims, int n);

 private:
  std::array<int64_t, kMaxDims> dims_{};
  int ndim_ = 0;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t byte_offset, Shape shape, DType dtype);

  // Fresh zero-filled storage; for set-up code and tests, not inside a step.
  static Tensor empty(Shape shape, DType dtype, Device device = Device::kCPU);
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::kCPU) {
    return empty(shape, dtype, device);
  }

  bool defined() const { return dtype_set_; }
  const Shape& shape() const { return shape_; }
  int64_t size(int i) const { return shape_[i]; }
  int ndim() const { return shape_.ndim(); }
  int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::kCPU; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() const {
    return storage_ ? static_cast<char*>(storage_->data()) + byte_offset_ : nullptr;
  }
  template <typename T>
  T* data() const {
    LMF_CHECK(DTypeOf<T>::value == dtype_, "tensor is {}, accessed as {}", dtype_name(dtype_),
              dtype_name(DTypeOf<T>::value));
    return static_cast<T*>(raw());
  }
  // bf16 elements as raw uint16_t bits (uint16_t itself maps to the u16 token dtype).
  uint16_t* bf16_data() const {
    LMF_CHECK(dtype_ == DType::kBF16, "tensor is {}, accessed as bf16", dtype_name(dtype_));
    return static_cast<uint16_t*>(raw());
  }

  // Same storage, new shape with the same numel (one dimension may be -1).
  Tensor view(Shape shape) const;
  // Rows [start, start + len) of the first dimension.
  Tensor slice(int64_t start, int64_t len) const;
  // Element i of the first dimension, with that dimension dropped.
  Tensor operator[](int64_t i) const;

  void zero_() const;
  void copy_from(const Tensor& src) const;  // same dtype and numel
  void fill_(double v) const;
  Tensor clone() const;
  // fp32 <-> fp64 / bf16 conversion into a fresh tensor (host tensors).
  Tensor to(DType dtype) const;
  // A copy on another device (host <-> CUDA).
  Tensor to(Device device) const;

  const std::shared_ptr<Storage>& storage() const { return storage_; }
  size_t byte_offset() const { return byte_offset_; }

 private:
  std::shared_ptr<Storage> storage_;
  size_t byte_offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::kF32;
  bool dtype_set_ = false;
};

// A tensor's bytes as fp32 words (int32 ids, fp64 statistics): what a gather moves unchanged.
inline Tensor as_words(const Tensor& t) {
  return Tensor(t.storage(), t.byte_offset(), Shape{static_cast<int64_t>(t.nbytes() / 4)},
                DType::kF32);
}

}  // namespace lmforge
