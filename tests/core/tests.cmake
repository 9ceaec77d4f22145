lmforge_test(test_core unit core/test_tensor.cpp core/test_rng.cpp core/test_utf8.cpp)
