lmforge_test(test_guard_and_accum unit train/test_guard_and_accum.cpp)
lmforge_test(test_objective reference train/test_objective.cpp)
