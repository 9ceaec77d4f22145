lmforge_test(test_sha256 unit io/test_sha256.cpp)
