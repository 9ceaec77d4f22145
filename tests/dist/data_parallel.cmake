# Data, tensor and sequence parallelism over MPI ranks against one process (label mpi); one
# binary each, sharing dist/dp_test.h's fixture.
lmforge_test(test_data_parallel mpi dist/test_data_parallel.cpp)
lmforge_test(test_tensor_parallel mpi dist/test_tensor_parallel.cpp)
lmforge_test(test_sequence_parallel mpi dist/test_sequence_parallel.cpp)
