lmforge_test(test_planner unit plan/test_planner.cpp)
