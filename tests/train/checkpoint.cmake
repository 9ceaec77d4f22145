lmforge_test(test_checkpoint unit train/test_checkpoint.cpp)
