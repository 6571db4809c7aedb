# Registered MPI tests (see longtune_add_mpi_test in CMakeLists.txt). Each area adds its lines.
