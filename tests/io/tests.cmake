lmforge_test(test_io unit io/test_config.cpp io/test_safetensors.cpp)
