// Communication between ranks, behind one interface (ExaMiniMD style): compute code never calls
// MPI, and single-rank runs and tests need no mpirun. Implementations:
//   SerialComm  one process (src/comm/serial_comm.hpp)
//   MpiComm     MPI (src/comm/mpi_comm.hpp); the NCCL backend for GPU buffers comes later.
// All collectives are blocking and must be called by every rank in the same order. Counts are in
// elements. "v" variants take one count per rank (pieces may be empty); the pieces are laid out
// in rank order in the full buffer.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace longtune {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank among the processes of this node (MPI_COMM_TYPE_SHARED), and their number.
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  // "serial" or "mpi".
  virtual std::string backend() const = 0;

  virtual void barrier() = 0;
  // bytes of `data` from `root` to every rank.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;

  // In-place sums over ranks.
  virtual void all_reduce_sum(double* data, size_t count) = 0;
  virtual void all_reduce_sum(float* data, size_t count) = 0;
  virtual void all_reduce_sum(int64_t* data, size_t count) = 0;
  // In-place max over ranks (e.g. "did any rank see a non-finite value").
  virtual void all_reduce_max(double* data, size_t count) = 0;

  // full (sum of counts) = concatenation of every rank's `mine` (counts[rank] elements each).
  virtual void all_gather_v(float* full, const float* mine, const std::vector<int64_t>& counts) = 0;
  // mine (counts[rank] elements) = sum over ranks of their `full` buffers' piece for this rank;
  // `full` holds sum(counts) elements, pieces in rank order.
  virtual void reduce_scatter_v(float* mine, const float* full, const std::vector<int64_t>& counts) = 0;
};

// MpiComm when the process was started by mpirun/srun (or MPI is already initialized), else
// SerialComm. MPI is initialized on first use and finalized when the last MpiComm goes away.
std::unique_ptr<Comm> make_comm();

}  // namespace longtune
