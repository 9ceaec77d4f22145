lmforge_test(test_hf_config unit models/test_hf_config.cpp)
lmforge_test(test_hf_reference reference models/test_hf_reference.cpp)
