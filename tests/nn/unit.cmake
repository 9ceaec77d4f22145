lmforge_test(test_nn unit nn/test_decode.cpp)
lmforge_test(test_recompute unit nn/test_recompute.cpp)
lmforge_test(test_profile unit nn/test_profile.cpp)
lmforge_test(test_packing unit nn/test_packing.cpp)
