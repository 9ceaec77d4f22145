# lmforge launch: several ranks of the binary through mpirun (label mpi).
lmforge_test(test_launch mpi dist/test_launch.cpp)
# srun: needs a Slurm cluster (scripts/slurm-local.sh), skips without one (label mpi).
lmforge_test(test_srun mpi dist/test_srun.cpp)
# Which world a launcher's variables give (torchrun's included); no MPI needed (label unit).
lmforge_test(test_world unit dist/test_world.cpp)
