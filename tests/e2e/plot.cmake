lmforge_test(test_plot_cli e2e e2e/test_plot_cli.cpp)
