// main() of longtune_mpi_tests: GoogleTest under MPI. Every rank runs every test; only rank 0
// prints the gtest report (others print failures only); the exit code is non-zero when any rank
// failed, so `mpirun -np N longtune_mpi_tests` fails as a whole.
#include <gtest/gtest.h>
#include <mpi.h>

#include <memory>

#include "src/optim/kokkos_scope.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = 0;
  {
    const longtune::KokkosScope kokkos;  // one Kokkos for the program (cannot re-initialize)
    failed = RUN_ALL_TESTS() != 0;
  }
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed;
}
