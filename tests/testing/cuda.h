// Device memory for the CUDA parity tests: a device copy of a host vector that frees itself.
#pragma once

#include <algorithm>
#include <vector>

#include "lmforge/backend/cuda/runtime.h"

namespace lmforge::testing {

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    p_ = static_cast<T*>(cuda::malloc(std::max<size_t>(n, 1) * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) {
    if (n_) cuda::memcpy(p_, v.data(), n_ * sizeof(T), cuda::Copy::kHostToDevice);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cuda::free(p_); }
  T* get() const { return p_; }
  // The contents on the host; waits for the stream first, so a failed kernel surfaces by name.
  std::vector<T> host() const {
    cuda::synchronize();
    std::vector<T> v(n_);
    if (n_) cuda::memcpy(v.data(), p_, n_ * sizeof(T), cuda::Copy::kDeviceToHost);
    return v;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace lmforge::testing
