lmforge_test(test_prepare unit data/test_prepare.cpp)
lmforge_test(test_prepare_chat unit data/test_prepare_chat.cpp)
lmforge_test(test_prepare_preference unit data/test_prepare_preference.cpp)
