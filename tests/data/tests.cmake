lmforge_test(test_data unit data/test_shard.cpp data/test_loader.cpp)
