lmforge_test(test_guard_and_accum unit train/test_guard_and_accum.cpp)
lmforge_test(test_objective reference train/test_objective.cpp)
lmforge_isa_variants(test_objective reference)  # the AVX2 and portable distillation kernels
