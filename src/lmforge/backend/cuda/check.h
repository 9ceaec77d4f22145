// Error checks for the CUDA backend's sources (.cpp and .cu; includes the CUDA runtime header).
// No fmt here: nvcc 13 rejects fmt 9's consteval format-string checks, so .cu files cannot
// include core/error.h. A failure throws lmforge::Error naming the call, its file:line and the
// runtime's message (runtime.cpp).
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace lmforge::cuda::detail {
[[noreturn]] void cuda_failed(int error, const char* call, const char* file, int line);
[[noreturn]] void raise(const std::string& message);  // throws lmforge::Error(message)
}  // namespace lmforge::cuda::detail

#define LMF_CUDA(call)                                                                       \
  do {                                                                                       \
    cudaError_t e_ = (call);                                                                 \
    if (e_ != cudaSuccess)                                                                   \
      ::lmforge::cuda::detail::cuda_failed(static_cast<int>(e_), #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, execution errors at the
// next synchronizing call.
#define LMF_CUDA_LAUNCHED() LMF_CUDA(cudaGetLastError())
