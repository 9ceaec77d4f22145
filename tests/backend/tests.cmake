lmforge_test(test_ops_reference reference backend/test_ops_reference.cpp)
lmforge_test(test_gradcheck unit backend/test_gradcheck.cpp)
lmforge_test(test_flash_attention unit backend/test_flash_attention.cpp)
lmforge_test(test_bf16 unit backend/test_bf16.cpp)
