lmforge_test(test_ops_reference reference backend/test_ops_reference.cpp)
lmforge_test(test_gradcheck unit backend/test_gradcheck.cpp)
