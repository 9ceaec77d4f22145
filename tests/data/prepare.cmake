lmforge_test(test_prepare unit data/test_prepare.cpp)
