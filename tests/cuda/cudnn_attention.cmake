# cuDNN fused flash attention (bf16) against the fp32 attention kernels; skips without a GPU.
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_cudnn_attention cuda cuda/test_cuda_cudnn_attention.cpp)
endif()
