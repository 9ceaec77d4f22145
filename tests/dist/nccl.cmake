# NcclCommunicator (label cuda: the GPU tests skip without a GPU; the TCP rendezvous tests run
# anywhere). Built only when CMake found NCCL (LMFORGE_HAVE_NCCL, top-level CMakeLists.txt).
if(LMFORGE_HAVE_NCCL)
  lmforge_test(test_nccl cuda dist/test_nccl.cpp)
endif()
