# Data parallelism over MPI ranks against one process (label mpi).
lmforge_test(test_data_parallel mpi dist/test_data_parallel.cpp)
