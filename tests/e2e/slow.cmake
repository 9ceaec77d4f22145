lmforge_test(test_e2e_slow slow e2e/test_slow.cpp)
