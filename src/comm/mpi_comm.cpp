// MpiComm. Design notes:
//
// * Determinism. MPI_Allreduce / MPI_Reduce_scatter may add the ranks' contributions in any order
//   (Open MPI picks ring, recursive-halving, Rabenseifner, ... by message size and process count,
//   and the choice may change with tuning or versions), so float sums would not be reproducible.
//   Every sum here is therefore a fixed-order reduction done locally:
//     reduce_scatter_v: each rank receives every other rank's copy of its piece (point-to-point,
//       i.e. an alltoallv) and computes ((x_0 + x_1) + x_2) + ... + x_{n-1} element by element.
//     all_reduce_*: small arrays (count * size <= 64 Ki elements): MPI_Allgather + the same
//       rank-order reduction on every rank; larger ones: the reduce_scatter above on a balanced
//       partition of the array, then an all-gather. Both give the same bits (same order).
//   The result depends only on the inputs and the world size, not on MPI's algorithms.
// * Large counts. MPI takes int counts and int displacements. No message here carries more than
//   max_msg_ (default INT_MAX) elements: broadcast and the point-to-point reduce_scatter work in
//   chunks; all_gather_v uses one MPI_Allgatherv when the whole buffer (hence every displacement)
//   fits in max_msg_ elements, else one MPI_Bcast per rank and chunk, addressed with 64-bit
//   pointer arithmetic, so no int displacement is ever needed.
// * Arguments are validated before any MPI call, on every rank alike, so misuse throws
//   InternalError everywhere instead of leaving some ranks waiting in a collective.
#include "src/comm/mpi_comm.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

#include "src/common/error.hpp"

namespace longtune {

std::string mpi_error_string(int err) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(err, buf, &len) != MPI_SUCCESS) return "MPI error code " + std::to_string(err);
  return std::string(buf, static_cast<size_t>(std::max(len, 0)));
}

void throw_mpi_error(int err, const char* call, const char* file, int line) {
  std::string msg = std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " +
                    mpi_error_string(err);
  for (char& c : msg)
    if (c == '\n' || c == '\r') c = ' ';
  throw MpiError(msg);
}

namespace {

// ---- MPI lifetime: initialized by the first MpiComm if nobody did it, finalized with the last.
std::mutex g_mpi_mutex;
int g_live_comms = 0;
bool g_we_initialized = false;

void acquire_mpi() {
  const std::lock_guard<std::mutex> lock(g_mpi_mutex);
  int initialized = 0, finalized = 0;
  LT_MPI_CHECK(MPI_Initialized(&initialized));
  LT_MPI_CHECK(MPI_Finalized(&finalized));
  if (finalized)
    throw MpiError("MpiComm: MPI was already finalized in this process and cannot be initialized again");
  if (!initialized) {
    int provided = MPI_THREAD_SINGLE;
    LT_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      throw MpiError("MPI_Init_thread: the MPI library provides thread level " + std::to_string(provided) +
                     ", longtune needs MPI_THREAD_FUNNELED (" + std::to_string(MPI_THREAD_FUNNELED) + ")");
    }
    g_we_initialized = true;
  }
  ++g_live_comms;
}

void release_mpi() noexcept {
  const std::lock_guard<std::mutex> lock(g_mpi_mutex);
  if (--g_live_comms > 0 || !g_we_initialized) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
  g_we_initialized = false;
}

// ---- element types and reductions
template <class T>
MPI_Datatype mpi_type();
template <>
MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <>
MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }
template <>
MPI_Datatype mpi_type<int64_t>() { return MPI_INT64_T; }

struct SumOp {
  template <class T>
  T operator()(T a, T b) const {
    if constexpr (std::is_integral_v<T>) {
      // Two's-complement wrap-around instead of signed-overflow UB.
      return static_cast<T>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
    } else {
      return a + b;
    }
  }
};

// Max that propagates NaN (a rank that saw a NaN must make everyone see it), unlike MPI_MAX
// whose NaN behaviour is unspecified.
struct MaxOp {
  double operator()(double a, double b) const {
    if (std::isnan(a)) return a;
    if (std::isnan(b)) return b;
    return a < b ? b : a;
  }
};

constexpr int kTag = 0x4c54;                      // point-to-point tag of reduce_scatter
constexpr int64_t kTile = 2048;                   // elements reduced per pass over the ranks
constexpr int64_t kSmallAllReduce = int64_t{1} << 16;  // count * size up to this: Allgather path
constexpr int64_t kRecvBudget = int64_t{1} << 26;      // elements of reduce_scatter receive buffers

// Checks counts (one per rank, none negative) and returns their prefix sums (size + 1 entries).
std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts, int size, const char* what) {
  LT_CHECK(counts.size() == static_cast<size_t>(size),
           std::string(what) + ": expected " + std::to_string(size) + " counts (one per rank), got " +
               std::to_string(counts.size()));
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) {
    LT_CHECK(counts[r] >= 0, std::string(what) + ": negative count " + std::to_string(counts[r]) +
                                 " for rank " + std::to_string(r));
    LT_CHECK(counts[r] <= std::numeric_limits<int64_t>::max() / 8 - off[r], std::string(what) + ": counts overflow");
    off[r + 1] = off[r] + counts[r];
  }
  return off;
}

}  // namespace

// ---- construction

MpiComm::MpiComm() : max_msg_(INT_MAX) {
  acquire_mpi();
  try {
    LT_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    LT_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    LT_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    LT_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    LT_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local_comm_));
    LT_MPI_CHECK(MPI_Comm_set_errhandler(local_comm_, MPI_ERRORS_RETURN));
    LT_MPI_CHECK(MPI_Comm_rank(local_comm_, &local_rank_));
    LT_MPI_CHECK(MPI_Comm_size(local_comm_, &local_size_));
  } catch (...) {
    if (local_comm_ != MPI_COMM_NULL) MPI_Comm_free(&local_comm_);
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    release_mpi();
    throw;
  }
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {  // errors ignored: a destructor cannot report them
    if (local_comm_ != MPI_COMM_NULL) MPI_Comm_free(&local_comm_);
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  release_mpi();
}

void MpiComm::set_max_message_elems(int64_t n) {
  LT_CHECK(n >= 1 && n <= INT_MAX, "max_message_elems must be in [1, INT_MAX], got " + std::to_string(n));
  max_msg_ = n;
}

// ---- collectives

void MpiComm::barrier() { LT_MPI_CHECK(MPI_Barrier(comm_)); }

void MpiComm::broadcast(void* data, size_t bytes, int root) {
  LT_CHECK(root >= 0 && root < size_,
           "broadcast: root " + std::to_string(root) + " out of range for " + std::to_string(size_) + " ranks");
  LT_CHECK(data != nullptr || bytes == 0, "broadcast: null buffer");
  auto* p = static_cast<char*>(data);
  for (size_t done = 0; done < bytes;) {
    const size_t len = std::min(bytes - done, static_cast<size_t>(max_msg_));
    LT_MPI_CHECK(MPI_Bcast(p + done, static_cast<int>(len), MPI_BYTE, root, comm_));
    done += len;
  }
}

template <class T, class Op>
void MpiComm::reduce_scatter_fixed_order(T* mine, const T* full, const std::vector<int64_t>& counts, Op op) {
  const std::vector<int64_t> off = offsets_of(counts, size_, "reduce_scatter_v");
  const int n = size_, me = rank_;
  const int64_t my = counts[me];
  LT_CHECK((mine != nullptr || my == 0) && (full != nullptr || off[n] == 0), "reduce_scatter_v: null buffer");
  const int64_t max_count = *std::max_element(counts.begin(), counts.end());
  if (max_count == 0) return;
  if (n == 1) {
    if (mine != full) std::memmove(mine, full, static_cast<size_t>(my) * sizeof(T));
    return;
  }
  // Elements per message: bounded by the MPI int limit and by the receive-buffer budget.
  const int64_t chunk = std::min(max_msg_, std::max(int64_t{1} << 16, kRecvBudget / (n - 1)));
  const int64_t cap = std::min(my, chunk);  // receive slot per peer
  std::vector<T> recv(static_cast<size_t>(cap) * static_cast<size_t>(n - 1));
  std::vector<MPI_Request> reqs;
  reqs.reserve(2 * static_cast<size_t>(n - 1));
  std::vector<const T*> src(static_cast<size_t>(n));
  std::vector<T> acc(static_cast<size_t>(kTile));
  const MPI_Datatype type = mpi_type<T>();
  auto slot_of = [me](int r) { return static_cast<size_t>(r < me ? r : r - 1); };

  // Every rank runs the same rounds (counts agree), so messages of round k match round k.
  for (int64_t base = 0; base < max_count; base += chunk) {
    reqs.clear();
    const int64_t len_me = std::clamp<int64_t>(my - base, 0, chunk);
    for (int r = 0; r < n && len_me > 0; ++r) {
      if (r == me) continue;
      MPI_Request req;
      LT_MPI_CHECK(MPI_Irecv(recv.data() + slot_of(r) * static_cast<size_t>(cap), static_cast<int>(len_me), type,
                             r, kTag, comm_, &req));
      reqs.push_back(req);
    }
    for (int r = 0; r < n; ++r) {
      const int64_t len_r = std::clamp<int64_t>(counts[r] - base, 0, chunk);
      if (r == me || len_r == 0) continue;
      MPI_Request req;
      LT_MPI_CHECK(MPI_Isend(full + off[r] + base, static_cast<int>(len_r), type, r, kTag, comm_, &req));
      reqs.push_back(req);
    }
    if (!reqs.empty())
      LT_MPI_CHECK(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
    if (len_me == 0) continue;

    for (int r = 0; r < n; ++r)
      src[r] = r == me ? full + off[me] + base : recv.data() + slot_of(r) * static_cast<size_t>(cap);
    T* out = mine + base;
    // Fixed order: ((x_0 + x_1) + x_2) + ...; a tile is read completely before it is written, so
    // `mine` may be full's own piece.
    for (int64_t t0 = 0; t0 < len_me; t0 += kTile) {
      const int64_t tl = std::min(kTile, len_me - t0);
      for (int64_t i = 0; i < tl; ++i) acc[i] = src[0][t0 + i];
      for (int r = 1; r < n; ++r) {
        const T* s = src[r] + t0;
        for (int64_t i = 0; i < tl; ++i) acc[i] = op(acc[i], s[i]);
      }
      std::memcpy(out + t0, acc.data(), static_cast<size_t>(tl) * sizeof(T));
    }
  }
}

template <class T>
void MpiComm::all_gather_v_impl(T* full, const T* mine, const std::vector<int64_t>& counts) {
  const std::vector<int64_t> off = offsets_of(counts, size_, "all_gather_v");
  const int n = size_, me = rank_;
  const int64_t total = off[n];
  LT_CHECK((mine != nullptr || counts[me] == 0) && (full != nullptr || total == 0), "all_gather_v: null buffer");
  if (total == 0) return;
  if (counts[me] > 0 && full + off[me] != mine)
    std::memmove(full + off[me], mine, static_cast<size_t>(counts[me]) * sizeof(T));
  if (n == 1) return;
  const MPI_Datatype type = mpi_type<T>();
  if (total <= max_msg_) {  // every count and displacement fits in an int
    std::vector<int> rc(static_cast<size_t>(n)), dp(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) {
      rc[r] = static_cast<int>(counts[r]);
      dp[r] = static_cast<int>(off[r]);
    }
    LT_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, full, rc.data(), dp.data(), type, comm_));
    return;
  }
  // Large: each rank broadcasts its piece in chunks of at most max_msg_ elements.
  for (int r = 0; r < n; ++r) {
    for (int64_t base = 0; base < counts[r]; base += max_msg_) {
      const int64_t len = std::min(max_msg_, counts[r] - base);
      LT_MPI_CHECK(MPI_Bcast(full + off[r] + base, static_cast<int>(len), type, r, comm_));
    }
  }
}

template <class T, class Op>
void MpiComm::all_reduce_fixed_order(T* data, size_t count, Op op) {
  LT_CHECK(data != nullptr || count == 0, "all_reduce: null buffer");
  LT_CHECK(count <= static_cast<size_t>(std::numeric_limits<int64_t>::max() / 8), "all_reduce: count too large");
  if (count == 0 || size_ == 1) return;  // every rank passes the same count
  const int n = size_;
  const auto c = static_cast<int64_t>(count);
  if (c * n <= std::min(kSmallAllReduce, max_msg_)) {
    std::vector<T> all(static_cast<size_t>(c * n));
    const MPI_Datatype type = mpi_type<T>();
    LT_MPI_CHECK(MPI_Allgather(data, static_cast<int>(c), type, all.data(), static_cast<int>(c), type, comm_));
    for (int64_t i = 0; i < c; ++i) {
      T s = all[i];
      for (int r = 1; r < n; ++r) s = op(s, all[r * c + i]);
      data[i] = s;
    }
    return;
  }
  // Balanced partition, fixed-order reduce-scatter, all-gather: same order, same bits.
  std::vector<int64_t> counts(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) counts[r] = c / n + (r < c % n ? 1 : 0);
  std::vector<T> piece(static_cast<size_t>(counts[rank_]));
  reduce_scatter_fixed_order(piece.data(), data, counts, op);
  all_gather_v_impl(data, piece.data(), counts);
}

void MpiComm::all_reduce_sum(double* data, size_t count) { all_reduce_fixed_order(data, count, SumOp{}); }
void MpiComm::all_reduce_sum(float* data, size_t count) { all_reduce_fixed_order(data, count, SumOp{}); }
void MpiComm::all_reduce_sum(int64_t* data, size_t count) { all_reduce_fixed_order(data, count, SumOp{}); }
void MpiComm::all_reduce_max(double* data, size_t count) { all_reduce_fixed_order(data, count, MaxOp{}); }

void MpiComm::all_gather_v(float* full, const float* mine, const std::vector<int64_t>& counts) {
  all_gather_v_impl(full, mine, counts);
}

void MpiComm::reduce_scatter_v(float* mine, const float* full, const std::vector<int64_t>& counts) {
  reduce_scatter_fixed_order(mine, full, counts, SumOp{});
}

}  // namespace longtune
