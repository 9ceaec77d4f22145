lmforge_test(test_io unit io/test_config.cpp io/test_safetensors.cpp)
lmforge_test(test_safetensors_reference reference io/test_safetensors_reference.cpp)
