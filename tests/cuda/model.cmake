# The model on the GPU against the CPU (logits, gradients, AdamW steps) and CLI training on
# train.device: cuda (label cuda: the GPU tests skip without one; the no-GPU error runs here).
if(LMFORGE_HAVE_CUDA)
  lmforge_test(test_cuda_model cuda cuda/test_cuda_model.cpp)
endif()
