// Error checks for CUDA runtime, cuBLASLt and cuDNN calls inside the CUDA backend (includes the
// CUDA headers: for backend/cuda/ sources only). A failure is an lmforge::Error naming the call,
// the file:line and the library's message.
#pragma once

#include <cuda_runtime.h>

#include "lmforge/core/error.h"

#define LMF_CUDA(call)                                                           \
  do {                                                                           \
    cudaError_t e_ = (call);                                                     \
    if (e_ != cudaSuccess)                                                       \
      ::lmforge::fail("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(e_), \
                      cudaGetErrorString(e_), #call, __FILE__, __LINE__);        \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, execution errors at the
// next synchronizing call.
#define LMF_CUDA_LAUNCHED() LMF_CUDA(cudaGetLastError())
