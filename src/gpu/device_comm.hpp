// Collectives on GPU buffers (the device twin of src/comm/comm.hpp): NCCL across ranks, or plain
// device-to-device copies for one rank. The host Comm stays the control plane (it broadcasts the
// NCCL unique id); compute code never calls NCCL directly.
//
// Determinism: unlike MpiComm, NCCL chooses its summation order (ring, tree, ... by size and
// topology), so sums match MpiComm's fixed rank order only up to rounding when there are more than
// two ranks (two ranks: one rounding of a + b, the same bits).
#pragma once
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/common/dtype.hpp"

namespace longtune::gpu {

// Collectives on device buffers, enqueued on a CUDA stream (they return before completion).
// Every rank must call them in the same order. Counts are in elements; "v" variants take one
// count per rank (pieces may be empty), pieces laid out in rank order in the full buffer.
// Buffers live on the current CUDA device; every dtype of DType is accepted (sums of U8, I32, I64
// wrap around as NCCL's do).
class DeviceComm {
 public:
  virtual ~DeviceComm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "nccl" or "single"
  // full (sum of counts elements) = concatenation of every rank's piece. In place allowed: mine ==
  // full + offset of this rank's piece; otherwise `mine` must not overlap `full`.
  virtual void all_gather_v(void* full, const void* mine, const std::vector<int64_t>& counts, DType dtype,
                            cudaStream_t stream) = 0;
  // mine (counts[rank] elements) = sum over ranks of their full buffer's piece for this rank.
  // In place allowed: mine == full + offset of this rank's piece; otherwise no overlap.
  virtual void reduce_scatter_v(void* mine, const void* full, const std::vector<int64_t>& counts, DType dtype,
                                cudaStream_t stream) = 0;
  // In-place sum over ranks of count elements (one ncclAllReduce with NCCL).
  virtual void all_reduce_sum(void* data, int64_t count, DType dtype, cudaStream_t stream) = 0;
};

// NCCL communicator over the ranks of host_comm (unique id made on rank 0 and broadcast with
// host_comm.broadcast), on the current CUDA device (the caller runs cudaSetDevice(local_rank)
// first), when host_comm.size() > 1; a "single" backend (plain cudaMemcpyAsync device-to-device
// where needed, no NCCL) when size() == 1. Collective over host_comm: every rank calls it.
std::unique_ptr<DeviceComm> make_device_comm(Comm& host_comm);

// NCCL's dtype for a DType (every DType has one).
ncclDataType_t nccl_dtype(DType t);

// Throws NcclError "<file>:<line>: <call> failed: <ncclGetErrorString> (<ncclGetLastError>)".
[[noreturn]] void throw_nccl_error(ncclResult_t res, const char* call, const char* file, int line);

}  // namespace longtune::gpu

// NCCL_CHECK(ncclXxx(...)): throws NcclError naming the call when it does not return ncclSuccess
// (blocking communicators only: ncclInProgress is an error here).
#define NCCL_CHECK(call)                                                                     \
  do {                                                                                       \
    const ncclResult_t lt_nccl_res_ = (call);                                                \
    if (lt_nccl_res_ != ncclSuccess) ::longtune::gpu::throw_nccl_error(lt_nccl_res_, #call, __FILE__, __LINE__); \
  } while (0)
