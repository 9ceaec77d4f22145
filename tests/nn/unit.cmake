lmforge_test(test_nn unit nn/test_decode.cpp)
