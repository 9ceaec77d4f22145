# AdamW's CUDA kernels against the CPU's, bit for bit (label cuda: the tests skip without a GPU).
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_optimizer cuda cuda/test_cuda_optimizer.cpp)
endif()
