lmforge_test(test_e2e e2e e2e/test_cli_errors.cpp e2e/test_training.cpp)
lmforge_test(test_sft e2e e2e/test_sft.cpp)
lmforge_test(test_objectives e2e e2e/test_objectives.cpp)
