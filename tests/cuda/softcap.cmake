# Soft-capping's CUDA kernels against the CPU's (label cuda: the tests skip without a GPU).
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_softcap cuda cuda/test_cuda_softcap.cpp)
endif()
