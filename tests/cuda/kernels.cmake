# The CUDA kernels (backend/cuda/kernels.h) against their CPU twins (label cuda: every test skips
# without a GPU). Built only with the CUDA backend (LMFORGE_HAVE_CUDA, top-level CMakeLists.txt).
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_kernels cuda cuda/test_cuda_kernels.cpp)
endif()
