lmforge_test(test_nn unit nn/test_decode.cpp)
lmforge_test(test_recompute unit nn/test_recompute.cpp)
