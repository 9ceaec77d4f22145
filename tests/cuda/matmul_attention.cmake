# The CUDA matmuls and flash attention against their CPU twins; skips without a GPU.
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_matmul_attention cuda cuda/test_cuda_matmul_attention.cpp)
endif()
