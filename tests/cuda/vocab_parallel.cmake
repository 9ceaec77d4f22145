# Vocabulary parallelism's CUDA ops against the CPU's (label cuda: the tests skip without a GPU).
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_vocab_parallel cuda cuda/test_cuda_vocab_parallel.cpp)
endif()
