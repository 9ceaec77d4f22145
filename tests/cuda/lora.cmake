# LoRA's CUDA ops (copy_block, dropout) against the CPU's (label cuda: the tests skip without a GPU).
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_lora cuda cuda/test_cuda_lora.cpp)
endif()
