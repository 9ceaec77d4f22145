lmforge_test(test_observability unit train/test_tensorboard.cpp train/test_progress.cpp
             train/test_dashboard.cpp)
lmforge_test(test_tensorboard_reference reference train/test_tensorboard_reference.cpp)
