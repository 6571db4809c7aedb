// longtune bench comm: the DeviceComm collectives (src/gpu/device_comm.hpp) on GPU buffers, one GPU
// per rank (GPU = local rank), measured as nccl-tests measures them: `--iters` back-to-back
// launches on one stream between two CUDA events after `--warmup` untimed ones, time = mean per
// launch (the maximum over ranks is reported), size = the full buffer (nccl-tests' "size"),
//   algbw = size / time,   busbw = algbw * 2(n-1)/n (all-reduce), algbw * (n-1)/n (reduce-scatter,
//   all-gather).
// all_reduce_sum is one plain ncclAllReduce call (the NCCL baseline); reduce_scatter_v and
// all_gather_v with equal counts are ncclReduceScatter / ncclAllGather, with unequal counts (3/4 of
// the buffer on rank 0) grouped ncclReduce / ncclBroadcast calls.
//
// Before timing, every collective at every size is checked once against the same collective done
// on the host by the MPI Comm (src/comm) on the same random values: gathers bit for bit, sums
// within the rounding of the dtype. A mismatch fails the run on every rank (exit 1).
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.cuh"
#include "src/cli/bench.hpp"
#include "src/cli/options.hpp"
#include "src/comm/comm.hpp"
#include "src/common/dtype.hpp"
#include "src/common/error.hpp"
#include "src/gpu/device_comm.hpp"
#include "src/gpu/device_memory.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

namespace {

// "64M", "1G", "512K", "4096" (binary multiples, as nccl-tests reads -b/-e), optional trailing B.
int64_t parse_size(const std::string& text) {
  std::string t = text;
  if (!t.empty() && (t.back() == 'B' || t.back() == 'b')) t.pop_back();
  int64_t mult = 1;
  if (!t.empty()) {
    const char s = char(std::toupper(static_cast<unsigned char>(t.back())));
    if (s == 'K' || s == 'M' || s == 'G') {
      mult = s == 'K' ? int64_t{1} << 10 : s == 'M' ? int64_t{1} << 20 : int64_t{1} << 30;
      t.pop_back();
    }
  }
  size_t pos = 0;
  int64_t v = 0;
  try {
    v = std::stoll(t, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (t.empty() || pos != t.size() || v <= 0 || v > (int64_t{1} << 40) / mult)
    throw ConfigError("--sizes: expected sizes in bytes like 64M,256M,1G, got '" + text + "'");
  return v * mult;
}

std::string format_size(int64_t bytes) {
  char buf[32];
  if (bytes >= (int64_t{1} << 30) && bytes % (int64_t{1} << 30) == 0) std::snprintf(buf, sizeof(buf), "%lld GiB", (long long)(bytes >> 30));
  else if (bytes >= (int64_t{1} << 20) && bytes % (int64_t{1} << 20) == 0) std::snprintf(buf, sizeof(buf), "%lld MiB", (long long)(bytes >> 20));
  else std::snprintf(buf, sizeof(buf), "%lld B", (long long)bytes);
  return buf;
}

// Magnitudes uniform in [0.25, 1), random signs, never zero: a counter-based splitmix64, about a
// nanosecond per value, the same values for a given seed whatever the size.
void fill_random(std::vector<float>& v, uint64_t seed) {
  for (size_t i = 0; i < v.size(); ++i) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (uint64_t(i) + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float mag = 0.25f + 0.75f * float(z >> 40) * (1.0f / 16777216.0f);
    v[i] = (z & 1u) ? -mag : mag;
  }
}

enum class Op { AllReduce, ReduceScatter, AllGather };

struct Case {
  Op op;
  std::string name;    // as printed
  std::string counts;  // "equal" or "3/4 on rank 0"
  std::vector<int64_t> piece_counts;  // per rank (all_reduce: one entry, the whole buffer)
  int64_t total = 0;                   // elements of the full buffer
  double bus_factor = 0;               // busbw / algbw
};

// Cases for a buffer of `elems` elements over n ranks.
std::vector<Case> cases_for(int64_t elems, int n) {
  std::vector<Case> cases;
  const double nd = double(n);
  // One rank: all_reduce_sum launches nothing (nothing to time); the others are device copies.
  if (n > 1) cases.push_back({Op::AllReduce, "all_reduce", "equal", {elems}, elems, 2.0 * (nd - 1) / nd});
  const int64_t per = elems / n;
  const std::vector<int64_t> equal(size_t(n), per);
  cases.push_back({Op::ReduceScatter, "reduce_scatter_v", "equal", equal, per * n, (nd - 1) / nd});
  cases.push_back({Op::AllGather, "all_gather_v", "equal", equal, per * n, (nd - 1) / nd});
  if (n > 1) {  // one rank: unequal counts do not exist
    std::vector<int64_t> uneven(size_t(n), 0);
    uneven[0] = elems * 3 / 4;
    const int64_t rest = elems - uneven[0];
    for (int r = 1; r < n; ++r) uneven[size_t(r)] = rest / (n - 1);
    uneven[size_t(n - 1)] += rest - rest / (n - 1) * (n - 1);
    cases.push_back({Op::ReduceScatter, "reduce_scatter_v", "3/4 on rank 0", uneven, elems, (nd - 1) / nd});
    cases.push_back({Op::AllGather, "all_gather_v", "3/4 on rank 0", uneven, elems, (nd - 1) / nd});
  }
  return cases;
}

struct Buffers {
  void* full = nullptr;  // the whole buffer (all_reduce data, reduce_scatter input, all_gather output)
  void* mine = nullptr;  // this rank's piece (reduce_scatter output, all_gather input)
};

void run_case(gpu::DeviceComm& dev, const Case& c, const Buffers& b, DType dtype, cudaStream_t stream) {
  switch (c.op) {
    case Op::AllReduce: dev.all_reduce_sum(b.full, c.total, dtype, stream); break;
    case Op::ReduceScatter: dev.reduce_scatter_v(b.mine, b.full, c.piece_counts, dtype, stream); break;
    case Op::AllGather: dev.all_gather_v(b.full, b.mine, c.piece_counts, dtype, stream); break;
  }
}

// Runs case c once on random values and compares with the host MPI Comm's result. Returns "" or
// this rank's first mismatch; `max_diff` gets the largest |device - host| seen.
std::string check_case(Comm& host, gpu::DeviceComm& dev, const Case& c, const Buffers& b, DType dtype,
                       cudaStream_t stream, uint64_t seed, double* max_diff) {
  const int n = host.size(), me = host.rank();
  const size_t esize = dtype_size(dtype);
  const int64_t my_count = c.op == Op::AllReduce ? c.total : c.piece_counts[size_t(me)];
  int64_t my_off = 0;
  if (c.op != Op::AllReduce)
    for (int r = 0; r < me; ++r) my_off += c.piece_counts[size_t(r)];
  // Input: the whole buffer (all_reduce, reduce_scatter) or this rank's piece (all_gather), rounded
  // to the dtype so the host sees exactly the device's values.
  std::vector<float> in(size_t(c.op == Op::AllGather ? my_count : c.total));
  fill_random(in, seed ^ (0xa0761d6478bd642full * uint64_t(me + 1)));
  std::vector<unsigned char> raw(in.size() * esize);
  convert_from_f32(raw.data(), in.data(), dtype, in.size());
  convert_to_f32(in.data(), raw.data(), dtype, in.size());
  void* dev_in = c.op == Op::AllGather ? b.mine : b.full;
  void* dev_out = c.op == Op::ReduceScatter ? b.mine : b.full;
  const size_t out_count = size_t(c.op == Op::ReduceScatter ? my_count : c.total);
  // Everything on `stream` (non-blocking: copies on the legacy default stream would not be ordered
  // before the collective).
  CUDA_CHECK(cudaMemcpyAsync(dev_in, raw.data(), raw.size(), cudaMemcpyHostToDevice, stream));
  if (c.op != Op::AllReduce)  // all ones bytes: NaN in every float dtype, so unwritten elements fail
    CUDA_CHECK(cudaMemsetAsync(dev_out, 0xff, out_count * esize, stream));
  run_case(dev, c, b, dtype, stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  raw.assign(out_count * esize, 0);
  CUDA_CHECK(cudaMemcpyAsync(raw.data(), dev_out, raw.size(), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> got(out_count);
  convert_to_f32(got.data(), raw.data(), dtype, out_count);
  raw = {};

  std::vector<float> ref;
  switch (c.op) {
    case Op::AllReduce:
      ref = std::move(in);
      host.all_reduce_sum(ref.data(), ref.size());
      break;
    case Op::ReduceScatter:
      ref.assign(size_t(my_count), 0.0f);
      host.reduce_scatter_v(ref.data(), in.data(), c.piece_counts);
      break;
    case Op::AllGather:
      ref.assign(size_t(c.total), 0.0f);
      host.all_gather_v(ref.data(), in.data(), c.piece_counts);
      break;
  }
  // Gathers move bits: exact. Sums: two ranks round a + b once on both sides (the dtype's rounding
  // of the host's fp32 sum); more ranks add up to n - 1 roundings of partial sums, each at most
  // sum |x| <= n (|x| < 1), in NCCL's order rather than MpiComm's rank order.
  double rtol = 0;
  if (c.op != Op::AllGather)
    rtol = dtype == DType::F32 ? 1e-5 : dtype == DType::BF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -10);
  const double partials = n > 2 ? double(n - 1) * double(n) : 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - double(ref[i]));
    const double tol = rtol * (std::fabs(double(ref[i])) + partials);
    if (!(d <= tol)) {  // NaN (an unwritten element) fails too
      char buf[320];
      std::snprintf(buf, sizeof(buf),
                    "rank %d: %s (%s) %s, %s: element %zu of %zu is %.9g on the GPU, the host MPI Comm gives "
                    "%.9g (tolerance %.3g)",
                    me, c.name.c_str(), c.counts.c_str(), format_size(c.total * int64_t(esize)).c_str(),
                    std::string(dtype_name(dtype)).c_str(), i + size_t(c.op == Op::ReduceScatter ? my_off : 0),
                    size_t(c.op == Op::ReduceScatter ? c.total : int64_t(got.size())), double(got[i]), double(ref[i]),
                    tol);
      return buf;
    }
    *max_diff = std::max(*max_diff, d);
  }
  return "";
}

// Mean seconds per launch of case c over `iters` launches after `warmup`, the maximum over ranks.
double time_case(Comm& host, gpu::DeviceComm& dev, const Case& c, const Buffers& b, DType dtype, cudaStream_t stream,
                 int64_t warmup, int64_t iters, cudaEvent_t start, cudaEvent_t stop) {
  for (int64_t i = 0; i < warmup; ++i) run_case(dev, c, b, dtype, stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  host.barrier();  // start together: the first timed launch does not wait for a late rank
  CUDA_CHECK(cudaEventRecord(start, stream));
  for (int64_t i = 0; i < iters; ++i) run_case(dev, c, b, dtype, stream);
  CUDA_CHECK(cudaEventRecord(stop, stream));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  double s = double(ms) * 1e-3 / double(iters);
  host.all_reduce_max(&s, 1);
  return s;
}

}  // namespace

int run_bench_comm(int argc, char** argv) {
  std::string sizes_arg = "64M,256M,1G", dtype_arg = "bf16";
  int64_t iters = 20, warmup = 5;
  bool no_check = false;
  po::options_description desc(
      "longtune bench comm: DeviceComm collectives on GPU buffers, one GPU per rank "
      "(mpirun -np N longtune bench comm)");
  desc.add_options()("help,h", "this text")
      ("sizes", po::value(&sizes_arg)->default_value(sizes_arg), "buffer sizes in bytes (K/M/G = 2^10/2^20/2^30), comma-separated")
      ("dtype", po::value(&dtype_arg)->default_value(dtype_arg), "bf16 | fp16 | fp32")
      ("iters", po::value(&iters)->default_value(iters), "timed launches per collective and size")
      ("warmup", po::value(&warmup)->default_value(warmup), "untimed launches before them")
      ("no-check", po::bool_switch(&no_check), "skip the correctness check against the host MPI Comm");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;
  DType dtype = DType::BF16;
  if (dtype_arg == "bf16") dtype = DType::BF16;
  else if (dtype_arg == "fp16") dtype = DType::F16;
  else if (dtype_arg == "fp32") dtype = DType::F32;
  else throw ConfigError("--dtype: expected bf16, fp16 or fp32, got " + dtype_arg);
  if (iters < 1) throw ConfigError("--iters: expected at least 1, got " + std::to_string(iters));
  if (warmup < 0) throw ConfigError("--warmup: expected at least 0, got " + std::to_string(warmup));
  std::vector<int64_t> sizes;
  for (size_t pos = 0; pos <= sizes_arg.size();) {
    const size_t comma = std::min(sizes_arg.find(',', pos), sizes_arg.size());
    sizes.push_back(parse_size(sizes_arg.substr(pos, comma - pos)));
    pos = comma + 1;
  }

  const auto host = make_comm();
  const int n = host->size(), me = host->rank();
  const size_t esize = dtype_size(dtype);
  for (const int64_t s : sizes)
    if (s < int64_t(esize) * n)
      throw ConfigError("--sizes: expected at least one element per rank (" + std::to_string(esize * size_t(n)) +
                        " bytes), got " + std::to_string(s));
  // GPU = local rank. The verdict is shared first: a rank without its GPU must not leave the others
  // waiting in NCCL's initialization.
  const int visible = cuda::device_count();
  double missing = visible <= host->local_rank() ? 1.0 : 0.0;
  host->all_reduce_max(&missing, 1);
  if (missing != 0.0) {
    if (visible <= host->local_rank())
      throw ConfigError("bench comm: expected a CUDA GPU for local rank " + std::to_string(host->local_rank()) +
                        " (one per rank on each node), found " + std::to_string(visible) + " visible");
    throw ConfigError("bench comm: expected a CUDA GPU for every rank, another rank found none for its local rank");
  }
  CUDA_CHECK(cudaSetDevice(host->local_rank()));
  const auto dev = gpu::make_device_comm(*host);

  const int64_t max_bytes = *std::max_element(sizes.begin(), sizes.end());
  gpu::DeviceArena arena;
  arena.allocate(2 * gpu::align_up(size_t(max_bytes)), "bench comm buffers");
  Buffers b;
  b.full = arena.take(size_t(max_bytes));
  b.mine = arena.take(size_t(max_bytes));  // the 3/4 piece needs most of it
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  // Stream and events go with the scope, also when a check or a call throws.
  struct Release {
    cudaStream_t s;
    cudaEvent_t a, z;
    ~Release() {
      cudaEventDestroy(a);
      cudaEventDestroy(z);
      cudaStreamDestroy(s);
    }
  } release{stream, start, stop};

  if (me == 0) {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, host->local_rank()));
    int nccl_version = 0;
    NCCL_CHECK(ncclGetVersion(&nccl_version));
    std::printf("[bench] comm: backend %s, %d rank%s, GPU = local rank (%s), %s, %lld timed launches after %lld "
                "warm-up, time = mean per launch, max over ranks\n",
                dev->backend().c_str(), n, n == 1 ? "" : "s", prop.name, dtype_arg.c_str(), (long long)iters,
                (long long)warmup);
    if (n == 1)
      std::printf("[bench] one rank: the single backend (device-to-device copies, no NCCL; all_reduce is a "
                  "no-op and is not timed); busbw is 0 by definition\n");
    else
      std::printf("[bench] NCCL %d.%d.%d, NCCL_NVLS_ENABLE=%s\n", nccl_version / 10000, nccl_version / 100 % 100,
                  nccl_version % 100, std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "(unset)");
    std::fflush(stdout);
  }

  struct Row {
    Case c;
    int64_t bytes;
    double s;
  };
  std::vector<Row> rows;
  uint64_t seed = 0x6c6f6e6774756e65ull;  // "longtune"
  for (const int64_t bytes : sizes) {
    const std::vector<Case> cases = cases_for(bytes / int64_t(esize), n);
    if (!no_check) {
      double max_diff = 0;
      for (const Case& c : cases) {
        const std::string mismatch = check_case(*host, *dev, c, b, dtype, stream, ++seed, &max_diff);
        double bad = mismatch.empty() ? 0.0 : 1.0;
        host->all_reduce_max(&bad, 1);  // every rank stops at the same case
        if (bad != 0.0) {
          if (!mismatch.empty()) std::fprintf(stderr, "[check] %s\n", mismatch.c_str());
          throw InternalError("bench comm: the GPU result of " + c.name + " (" + c.counts + ", " +
                              format_size(bytes) + ") differs from the host MPI Comm's (first mismatch above)");
        }
      }
      host->all_reduce_max(&max_diff, 1);
      if (me == 0)
        std::printf("[check] %s: %zu collectives match the host MPI Comm (gathers bit for bit, sums max |diff| "
                    "%.3g)\n",
                    format_size(bytes).c_str(), cases.size(), max_diff);
    }
    for (const Case& c : cases)
      rows.push_back({c, c.total * int64_t(esize), time_case(*host, *dev, c, b, dtype, stream, warmup, iters, start, stop)});
  }

  if (me == 0) {
    std::printf("\n%-18s %-14s %10s %12s %13s %13s\n", "collective", "counts", "size", "time (us)", "algbw (GB/s)",
                "busbw (GB/s)");
    for (const Row& r : rows) {
      const double algbw = double(r.bytes) / r.s / 1e9;
      std::printf("%-18s %-14s %10s %12.1f %13.2f %13.2f\n", r.c.name.c_str(), r.c.counts.c_str(),
                  format_size(r.bytes).c_str(), r.s * 1e6, algbw, algbw * r.c.bus_factor);
    }
    if (n > 1)
      std::printf("busbw as nccl-tests defines it (all-reduce x 2(n-1)/n, reduce-scatter / all-gather x (n-1)/n); "
                  "for \"3/4 on rank 0\" the same factor, though that layout's ideal is below it\n");
    for (const Row& r : rows) {
      const double algbw = double(r.bytes) / r.s / 1e9;
      std::printf("[RESULT] {\"bench\":\"comm\",\"backend\":\"%s\",\"ranks\":%d,\"dtype\":\"%s\",\"collective\":\"%s\","
                  "\"counts\":\"%s\",\"bytes\":%lld,\"iters\":%lld,\"time_us\":%.2f,\"algbw_gbs\":%.3f,"
                  "\"busbw_gbs\":%.3f}\n",
                  dev->backend().c_str(), n, dtype_arg.c_str(), r.c.name.c_str(), r.c.counts.c_str(),
                  (long long)r.bytes, (long long)iters, r.s * 1e6, algbw, algbw * r.c.bus_factor);
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace longtune::cli
