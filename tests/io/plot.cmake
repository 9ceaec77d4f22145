lmforge_test(test_plot unit io/test_plot.cpp)
lmforge_test(test_plot_reference reference io/test_plot_reference.cpp)
