lmforge_test(test_e2e_reliability e2e e2e/test_reliability.cpp)
