#include "src/comm/comm.hpp"

#include <mpi.h>

#include <cstdlib>

#include "src/comm/mpi_comm.hpp"
#include "src/comm/serial_comm.hpp"

namespace longtune {

namespace {

// Set by the launchers: Open MPI's mpirun, PMI-1/2 (MPICH, Intel MPI), PMIx, Slurm's srun.
bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && *v != '\0') return true;
  }
  return false;
}

bool mpi_initialized() {
  int initialized = 0, finalized = 0;
  // Both may be called before MPI_Init and after MPI_Finalize.
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

std::unique_ptr<Comm> make_comm() {
  if (launched_by_mpi() || mpi_initialized()) return std::make_unique<MpiComm>();
  return std::make_unique<SerialComm>();
}

}  // namespace longtune
