# lmforge launch: several ranks of the binary through mpirun (label mpi).
lmforge_test(test_launch mpi dist/test_launch.cpp)
