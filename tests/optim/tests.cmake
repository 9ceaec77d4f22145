lmforge_test(test_adamw_reference reference optim/test_adamw_reference.cpp)
lmforge_test(test_schedule unit optim/test_schedule.cpp)
lmforge_test(test_stochastic_round unit optim/test_stochastic_round.cpp)
