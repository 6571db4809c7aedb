// DeviceComm backends. Design notes:
//
// * Equal counts map to NCCL's own collectives (ncclAllGather / ncclReduceScatter), NCCL's fastest
//   path. Unequal counts have no NCCL collective: all_gather_v is one ncclBroadcast per non-empty
//   piece (root = its owner, written straight into its place in `full`), reduce_scatter_v one
//   ncclReduce per non-empty piece (root = its owner, result into `mine`), each inside one
//   ncclGroupStart/End so NCCL runs them as one fused launch rather than n serialized ones.
// * In place is NCCL's definition: `mine` is exactly this rank's piece of `full`. Inside a group the
//   operations touch disjoint pieces, so in place needs no extra care there; any other overlap of
//   `mine` and `full` is refused (NCCL would silently read half-written data).
// * Arguments are validated before any NCCL call, identically on every rank (counts are the same
//   everywhere), so misuse throws InternalError on every rank instead of leaving some of them
//   waiting inside a collective.
#include "src/gpu/device_comm.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "kernels/cuda/cuda_check.cuh"
#include "src/common/error.hpp"

namespace longtune::gpu {

void throw_nccl_error(ncclResult_t res, const char* call, const char* file, int line) {
  std::string msg = std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " + ncclGetErrorString(res);
  // The last error's text says which argument or resource failed (empty when NCCL has none).
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') msg += std::string(" (") + last + ")";
  for (char& c : msg)
    if (c == '\n' || c == '\r') c = ' ';
  throw NcclError(msg);
}

ncclDataType_t nccl_dtype(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::F64: return ncclFloat64;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
    case DType::U8: return ncclUint8;
  }
  throw InternalError("nccl_dtype: unknown DType " + std::to_string(int(t)));
}

namespace {

// The pieces of a "v" collective: offsets in bytes (size + 1 prefix sums), whether every count is
// the same (NCCL's own collectives apply), this rank's piece.
struct Pieces {
  std::vector<int64_t> off_bytes;
  int64_t total_bytes = 0, my_off = 0, my_bytes = 0;
  size_t elem = 0;
  bool equal = true;
};

Pieces pieces_of(const std::vector<int64_t>& counts, int size, int rank, DType dtype, const char* what) {
  LT_CHECK(counts.size() == size_t(size), std::string(what) + ": expected " + std::to_string(size) +
                                               " counts (one per rank), got " + std::to_string(counts.size()));
  Pieces p;
  p.elem = dtype_size(dtype);
  p.off_bytes.assign(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) {
    LT_CHECK(counts[r] >= 0, std::string(what) + ": negative count " + std::to_string(counts[r]) + " for rank " +
                                 std::to_string(r));
    const int64_t bytes_left = (std::numeric_limits<int64_t>::max() - p.off_bytes[r]) / int64_t(p.elem);
    LT_CHECK(counts[r] <= bytes_left, std::string(what) + ": counts overflow");
    p.off_bytes[r + 1] = p.off_bytes[r] + counts[r] * int64_t(p.elem);
    p.equal = p.equal && counts[r] == counts[0];
  }
  p.total_bytes = p.off_bytes.back();
  p.my_off = p.off_bytes[size_t(rank)];
  p.my_bytes = p.off_bytes[size_t(rank) + 1] - p.my_off;
  return p;
}

// Whether `mine` is `full`'s own piece (in place). Null buffers are refused where bytes move, and
// any other overlap of `mine` with `full`.
bool check_buffers(const void* full, const void* mine, const Pieces& p, const char* what) {
  LT_CHECK(full != nullptr || p.total_bytes == 0, std::string(what) + ": null full buffer");
  if (p.my_bytes == 0) return false;  // this rank's piece moves no bytes
  LT_CHECK(mine != nullptr, std::string(what) + ": null buffer for this rank's piece");
  const auto f = reinterpret_cast<uintptr_t>(full), m = reinterpret_cast<uintptr_t>(mine);
  if (m == f + uintptr_t(p.my_off)) return true;
  LT_CHECK(m + uintptr_t(p.my_bytes) <= f || m >= f + uintptr_t(p.total_bytes),
           std::string(what) + ": `mine` overlaps `full` without being this rank's piece (offset " +
               std::to_string(p.my_off) + " bytes)");
  return false;
}

// ---- one rank: no NCCL, a copy where the piece is not already in place ------------------------
class SingleDeviceComm final : public DeviceComm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "single"; }

  void all_gather_v(void* full, const void* mine, const std::vector<int64_t>& counts, DType dtype,
                    cudaStream_t stream) override {
    const Pieces p = pieces_of(counts, 1, 0, dtype, "all_gather_v");
    if (p.total_bytes == 0 || check_buffers(full, mine, p, "all_gather_v")) return;
    CUDA_CHECK(cudaMemcpyAsync(full, mine, size_t(p.total_bytes), cudaMemcpyDeviceToDevice, stream));
  }

  void reduce_scatter_v(void* mine, const void* full, const std::vector<int64_t>& counts, DType dtype,
                        cudaStream_t stream) override {
    const Pieces p = pieces_of(counts, 1, 0, dtype, "reduce_scatter_v");
    if (p.total_bytes == 0 || check_buffers(full, mine, p, "reduce_scatter_v")) return;
    CUDA_CHECK(cudaMemcpyAsync(mine, full, size_t(p.total_bytes), cudaMemcpyDeviceToDevice, stream));
  }

  // A sum over one rank is the value itself.
  void all_reduce_sum(void* data, int64_t count, DType dtype, cudaStream_t) override {
    LT_CHECK(count >= 0, "all_reduce_sum: negative count " + std::to_string(count));
    LT_CHECK(data != nullptr || count == 0, "all_reduce_sum: null buffer");
    (void)nccl_dtype(dtype);  // same dtype check as the NCCL backend
  }
};

// ---- NCCL -------------------------------------------------------------------------------------

// ncclGroupStart/End as a scope: an error thrown between them still closes the group (NCCL keeps
// per-thread group state; a group left open would swallow the next collective).
class NcclGroup {
 public:
  NcclGroup() { NCCL_CHECK(ncclGroupStart()); }
  ~NcclGroup() {
    if (open_) (void)ncclGroupEnd();  // an error is already on its way; this one adds nothing
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  void end() {
    open_ = false;
    NCCL_CHECK(ncclGroupEnd());
  }

 private:
  bool open_ = true;
};

class NcclDeviceComm final : public DeviceComm {
 public:
  explicit NcclDeviceComm(Comm& host) : rank_(host.rank()), size_(host.size()) {
    // NVLink multicast (NVLS) is disabled on the lent machines: NCCL would try to set it up and
    // fail. overwrite = 0: a user who exports NCCL_NVLS_ENABLE keeps their value.
    if (setenv("NCCL_NVLS_ENABLE", "0", 0) != 0)
      throw SystemError(std::string("setenv(\"NCCL_NVLS_ENABLE\", \"0\", 0) failed: ") + std::strerror(errno));
    // Rank 0 makes the id; its success travels with it, so a failure there throws on every rank
    // instead of leaving the others waiting in ncclCommInitRank.
    struct {
      int32_t ok = 0;
      ncclUniqueId id{};
    } msg;
    ncclResult_t id_res = ncclSuccess;
    if (rank_ == 0) {
      id_res = ncclGetUniqueId(&msg.id);
      msg.ok = id_res == ncclSuccess;
    }
    host.broadcast(&msg, sizeof(msg), 0);
    if (!msg.ok) {
      if (rank_ == 0) throw_nccl_error(id_res, "ncclGetUniqueId(&msg.id)", __FILE__, __LINE__);
      throw NcclError("ncclGetUniqueId failed on rank 0 (its error names the cause): no NCCL communicator");
    }
    NCCL_CHECK(ncclCommInitRank(&comm_, size_, msg.id, rank_));
  }

  ~NcclDeviceComm() override {
    if (comm_ != nullptr) (void)ncclCommDestroy(comm_);  // waits for enqueued work; errors ignored
  }
  NcclDeviceComm(const NcclDeviceComm&) = delete;
  NcclDeviceComm& operator=(const NcclDeviceComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_gather_v(void* full, const void* mine, const std::vector<int64_t>& counts, DType dtype,
                    cudaStream_t stream) override {
    const Pieces p = pieces_of(counts, size_, rank_, dtype, "all_gather_v");
    const ncclDataType_t type = nccl_dtype(dtype);
    if (p.total_bytes == 0) return;
    check_buffers(full, mine, p, "all_gather_v");
    if (p.equal) {  // in place when mine == full + rank * count, NCCL's own rule
      NCCL_CHECK(ncclAllGather(mine, full, size_t(counts[0]), type, comm_, stream));
      return;
    }
    char* f = static_cast<char*>(full);
    NcclGroup group;
    for (int r = 0; r < size_; ++r) {
      if (counts[size_t(r)] == 0) continue;
      void* piece = f + p.off_bytes[size_t(r)];
      // sendbuff is read on the root only; elsewhere pass the piece itself (ncclBcast's form).
      const void* send = r == rank_ ? mine : piece;
      NCCL_CHECK(ncclBroadcast(send, piece, size_t(counts[size_t(r)]), type, r, comm_, stream));
    }
    group.end();
  }

  void reduce_scatter_v(void* mine, const void* full, const std::vector<int64_t>& counts, DType dtype,
                        cudaStream_t stream) override {
    const Pieces p = pieces_of(counts, size_, rank_, dtype, "reduce_scatter_v");
    const ncclDataType_t type = nccl_dtype(dtype);
    if (p.total_bytes == 0) return;
    check_buffers(full, mine, p, "reduce_scatter_v");
    if (p.equal) {  // in place when mine == full + rank * count, NCCL's own rule
      NCCL_CHECK(ncclReduceScatter(full, mine, size_t(counts[0]), type, ncclSum, comm_, stream));
      return;
    }
    const char* f = static_cast<const char*>(full);
    NcclGroup group;
    for (int r = 0; r < size_; ++r) {
      if (counts[size_t(r)] == 0) continue;
      const void* piece = f + p.off_bytes[size_t(r)];
      // recvbuff is written on the root only; elsewhere pass the piece (in-place form, as
      // torch.distributed.reduce does): NCCL neither checks nor writes it there.
      void* recv = r == rank_ ? mine : const_cast<void*>(piece);
      NCCL_CHECK(ncclReduce(piece, recv, size_t(counts[size_t(r)]), type, ncclSum, r, comm_, stream));
    }
    group.end();
  }

  void all_reduce_sum(void* data, int64_t count, DType dtype, cudaStream_t stream) override {
    LT_CHECK(count >= 0, "all_reduce_sum: negative count " + std::to_string(count));
    const ncclDataType_t type = nccl_dtype(dtype);
    if (count == 0) return;
    LT_CHECK(data != nullptr, "all_reduce_sum: null buffer");
    NCCL_CHECK(ncclAllReduce(data, data, size_t(count), type, ncclSum, comm_, stream));
  }

 private:
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<DeviceComm> make_device_comm(Comm& host_comm) {
  if (host_comm.size() == 1) return std::make_unique<SingleDeviceComm>();
  return std::make_unique<NcclDeviceComm>(host_comm);
}

}  // namespace longtune::gpu
