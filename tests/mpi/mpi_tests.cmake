# Registered MPI tests (see longtune_add_mpi_test in CMakeLists.txt). Each area adds its lines.
longtune_add_mpi_test(NAME mpi.comm.np1 NP 1 FILTER CommMpi.*)
longtune_add_mpi_test(NAME mpi.comm.np2 NP 2 FILTER CommMpi.*)
longtune_add_mpi_test(NAME mpi.comm.np3 NP 3 FILTER CommMpi.*)
longtune_add_mpi_test(NAME mpi.comm.np4 NP 4 FILTER CommMpi.*)
foreach(np 1 2 3 4)
  longtune_add_mpi_test(NAME mpi.sharded_training.np${np} NP ${np} FILTER ShardedTraining.* TIMEOUT 900)
endforeach()
