// MpiComm: Comm over MPI (host buffers). Works on a duplicate of MPI_COMM_WORLD with
// MPI_ERRORS_RETURN, so a failing call throws MpiError (call text + MPI's message) instead of
// aborting the job. MPI is initialized here when nobody did it before (MPI_THREAD_FUNNELED), and
// finalized when the last MpiComm that saw it initialized this way goes away.
//
// Determinism: every sum (reduce_scatter_v, all_reduce_sum) is a fixed-order reduction computed
// locally, rank 0 + rank 1 + ... + rank n-1, never MPI's own reduction (whose order depends on the
// algorithm Open MPI picks by message size and topology). So the same inputs give the same bits
// on every run and every algorithm, for a given world size; bit-exact resume depends on this.
//
// Sizes: counts and offsets are int64 throughout. No MPI message carries more than
// max_message_elems() elements (default INT_MAX) and no int displacement is ever beyond it: larger
// operations are done in chunks (see mpi_comm.cpp).
#pragma once
#include <mpi.h>

#include <cstdint>
#include <string>

#include "src/comm/comm.hpp"

namespace longtune {

// MPI's text for an error code (MPI_Error_string).
std::string mpi_error_string(int err);
// Throws MpiError "<file>:<line>: <call> failed: <MPI message>" (one line).
[[noreturn]] void throw_mpi_error(int err, const char* call, const char* file, int line);

class MpiComm final : public Comm {
 public:
  // Over MPI_COMM_WORLD; initializes MPI if needed.
  MpiComm();
  ~MpiComm() override;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string backend() const override { return "mpi"; }

  void barrier() override;
  void broadcast(void* data, size_t bytes, int root) override;

  void all_reduce_sum(double* data, size_t count) override;
  void all_reduce_sum(float* data, size_t count) override;
  void all_reduce_sum(int64_t* data, size_t count) override;
  void all_reduce_max(double* data, size_t count) override;

  // `mine` may be full's own piece or disjoint from `full`.
  void all_gather_v(float* full, const float* mine, const std::vector<int64_t>& counts) override;
  // `mine` may be full's own piece or disjoint from `full`.
  void reduce_scatter_v(float* mine, const float* full, const std::vector<int64_t>& counts) override;

  // The duplicated communicator (for code that needs raw MPI, e.g. MPI-IO).
  MPI_Comm comm() const { return comm_; }

  // Largest number of elements in one MPI message, and the limit of the int displacements used
  // (default INT_MAX). Tests lower it to run the chunked large-count paths on small buffers.
  // Must be the same on every rank.
  int64_t max_message_elems() const { return max_msg_; }
  void set_max_message_elems(int64_t n);

 private:
  template <class T, class Op>
  void reduce_scatter_fixed_order(T* mine, const T* full, const std::vector<int64_t>& counts, Op op);
  template <class T>
  void all_gather_v_impl(T* full, const T* mine, const std::vector<int64_t>& counts);
  template <class T, class Op>
  void all_reduce_fixed_order(T* data, size_t count, Op op);

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm local_comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  int64_t max_msg_;
};

}  // namespace longtune

// LT_MPI_CHECK(MPI_Xxx(...)): throws MpiError naming the call when it does not return MPI_SUCCESS.
// Needs MPI_ERRORS_RETURN on the communicator involved (MpiComm sets it on its own).
#define LT_MPI_CHECK(call)                                                                     \
  do {                                                                                         \
    const int lt_mpi_err_ = (call);                                                            \
    if (lt_mpi_err_ != MPI_SUCCESS) ::longtune::throw_mpi_error(lt_mpi_err_, #call, __FILE__, __LINE__); \
  } while (0)
