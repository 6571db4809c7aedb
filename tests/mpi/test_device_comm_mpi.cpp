// DeviceComm under mpirun (src/gpu/device_comm.hpp), one GPU per rank (GPU = local rank): the NCCL
// backend (the single one on one rank) against MpiComm on the same random values, fp32 and bf16,
// equal counts (ncclAllGather / ncclReduceScatter) and unequal ones with empty pieces (grouped
// ncclBroadcast / ncclReduce), in place and not. Gathers must match bit for bit; sums within the
// dtype's rounding (NCCL adds in its own order, MpiComm in rank order). Outputs are poisoned (NaN)
// first, so an element NCCL should write but does not fails.
// Skipped on every rank together when a node has fewer visible GPUs than ranks (CI has none).
#if LONGTUNE_HAVE_CUDA
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.cuh"
#include "src/comm/comm.hpp"
#include "src/common/dtype.hpp"
#include "src/common/error.hpp"
#include "src/gpu/device_comm.hpp"
#include "tests/cuda/gpu_test_util.hpp"

namespace longtune {
namespace {

using test::DeviceBuffer;

// Device bytes with at least one byte allocated, so an empty piece still has a valid pointer and no
// zero-byte copy is ever asked of CUDA.
class Bytes {
 public:
  explicit Bytes(size_t n) : n_(n), buf_(std::max<size_t>(n, 1)) {}
  explicit Bytes(const std::vector<unsigned char>& host) : Bytes(host.size()) {
    if (n_ > 0) CUDA_CHECK(cudaMemcpy(buf_.get(), host.data(), n_, cudaMemcpyHostToDevice));
  }
  unsigned char* get() { return buf_.get(); }
  // All ones bytes: NaN in every float dtype, so an element that should be written but is not fails.
  void poison() {
    if (n_ > 0) CUDA_CHECK(cudaMemset(buf_.get(), 0xff, n_));
  }
  std::vector<unsigned char> download() {
    std::vector<unsigned char> host(n_);
    if (n_ > 0) CUDA_CHECK(cudaMemcpy(host.data(), buf_.get(), n_, cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  size_t n_;
  DeviceBuffer<unsigned char> buf_;
};

// Rank r's values for case `salt`: magnitudes in [0.25, 1), random signs, never zero.
std::vector<float> values(uint64_t seed, int r, uint64_t salt, int64_t n) {
  std::mt19937_64 g(seed ^ (0x9e3779b97f4a7c15ULL * (uint64_t(r) + 1)) ^ (salt << 20));
  std::uniform_real_distribution<float> mag(0.25f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = (g() & 1u) ? -mag(g) : mag(g);
  return v;
}

// v rounded to dtype t in place; returns its bytes in t.
std::vector<unsigned char> to_bytes(std::vector<float>& v, DType t) {
  std::vector<unsigned char> b(v.size() * dtype_size(t));
  convert_from_f32(b.data(), v.data(), t, v.size());
  convert_to_f32(v.data(), b.data(), t, v.size());
  return b;
}

std::vector<float> from_bytes(const std::vector<unsigned char>& b, DType t, int64_t first, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  convert_to_f32(v.data(), b.data() + size_t(first) * dtype_size(t), t, size_t(n));
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// Sums of n values of magnitude < 1: two ranks round a + b once on both sides; more ranks add up to
// n - 1 roundings of partial sums of magnitude <= n, in NCCL's order.
template <class T>
void expect_close(const std::vector<T>& got, const std::vector<T>& ref, DType t, int n, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const double rtol = t == DType::F64 ? 1e-13 : t == DType::F32 ? 1e-5 : std::ldexp(1.0, -8);
  const double partials = n > 2 ? double(n - 1) * double(n) : 0.0;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - double(ref[i]));
    if (!(d <= rtol * (std::fabs(double(ref[i])) + partials)) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off, first " << first << ": "
                     << (bad ? double(got[first]) : 0.0) << " vs MpiComm " << (bad ? double(ref[first]) : 0.0);
}

// Count patterns for n ranks: equal (NCCL's own collectives), uneven with empty pieces, one rank
// holding everything, 3/4 of a large buffer on rank 0, all empty.
std::vector<std::vector<int64_t>> count_patterns(int n) {
  std::vector<std::vector<int64_t>> p;
  p.emplace_back(size_t(n), 1000);
  p.emplace_back(size_t(n), 333);
  const size_t nr = static_cast<size_t>(n);
  std::vector<int64_t> a(nr), b(nr, 0), c(nr);
  for (int r = 0; r < n; ++r) a[size_t(r)] = r == 1 ? 0 : 500 + 37 * r;  // rank 1's piece empty
  b[size_t(n - 1)] = 1000;
  c[0] = 3 * (int64_t{1} << 18);  // several NCCL chunks
  for (int r = 1; r < n; ++r) c[size_t(r)] = (int64_t{1} << 18) / (n - 1) + r;
  p.push_back(a);
  p.push_back(b);
  p.push_back(c);
  p.emplace_back(size_t(n), 0);
  return p;
}

std::string describe(const std::vector<int64_t>& counts, DType t) {
  std::string s = std::string(dtype_name(t)) + ", counts {";
  for (size_t r = 0; r < counts.size(); ++r) s += (r ? "," : "") + std::to_string(counts[r]);
  return s + "}";
}

const DType kDtypes[] = {DType::F32, DType::BF16};

class DeviceCommMpi : public ::testing::Test {
 protected:
  void SetUp() override {
    host_ = make_comm();
    // Decided together: a rank skipping alone would leave the others in ncclCommInitRank.
    double missing = cuda::device_count() <= host_->local_rank() ? 1.0 : 0.0;
    host_->all_reduce_max(&missing, 1);
    if (missing != 0.0) GTEST_SKIP() << "fewer visible CUDA GPUs than ranks on a node";
    CUDA_CHECK(cudaSetDevice(host_->local_rank()));
    dev_ = gpu::make_device_comm(*host_);
    // A blocking stream: the helpers' cudaMemcpy / cudaMemset (legacy default stream) are ordered
    // before the collectives enqueued on it.
    CUDA_CHECK(cudaStreamCreate(&stream_));
    if (host_->rank() == 0) seed_ = (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
    host_->broadcast(&seed_, sizeof(seed_), 0);
  }
  void TearDown() override {
    dev_.reset();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  void sync() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  std::unique_ptr<Comm> host_;
  std::unique_ptr<gpu::DeviceComm> dev_;
  cudaStream_t stream_ = nullptr;
  uint64_t seed_ = 0;
};

TEST_F(DeviceCommMpi, Backend) {
  EXPECT_EQ(dev_->backend(), host_->size() > 1 ? "nccl" : "single");
  EXPECT_EQ(dev_->rank(), host_->rank());
  EXPECT_EQ(dev_->size(), host_->size());
}

TEST_F(DeviceCommMpi, AllGatherMatchesMpi) {
  const int n = host_->size(), me = host_->rank();
  uint64_t salt = 0;
  for (const DType t : kDtypes) {
    const size_t es = dtype_size(t);
    for (const auto& counts : count_patterns(n)) {
      const std::string what = describe(counts, t);
      int64_t off = 0, total = 0;
      for (int r = 0; r < me; ++r) off += counts[size_t(r)];
      for (const int64_t c : counts) total += c;
      auto mine = values(seed_, me, ++salt, counts[size_t(me)]);
      const auto mine_bytes = to_bytes(mine, t);
      std::vector<float> ref(static_cast<size_t>(total));
      host_->all_gather_v(ref.data(), mine.data(), counts);

      Bytes dmine(mine_bytes), dfull(size_t(total) * es);
      dfull.poison();
      dev_->all_gather_v(dfull.get(), dmine.get(), counts, t, stream_);
      sync();
      EXPECT_TRUE(same_bits(from_bytes(dfull.download(), t, 0, total), ref)) << what;

      // In place: this rank's piece already sits in full.
      Bytes dfull2(size_t(total) * es);
      dfull2.poison();
      if (!mine_bytes.empty())
        CUDA_CHECK(cudaMemcpy(dfull2.get() + size_t(off) * es, mine_bytes.data(), mine_bytes.size(), cudaMemcpyHostToDevice));
      dev_->all_gather_v(dfull2.get(), dfull2.get() + size_t(off) * es, counts, t, stream_);
      sync();
      EXPECT_TRUE(same_bits(from_bytes(dfull2.download(), t, 0, total), ref)) << "in place, " << what;
    }
  }
}

TEST_F(DeviceCommMpi, ReduceScatterMatchesMpi) {
  const int n = host_->size(), me = host_->rank();
  uint64_t salt = 100;
  for (const DType t : kDtypes) {
    const size_t es = dtype_size(t);
    for (const auto& counts : count_patterns(n)) {
      const std::string what = describe(counts, t);
      int64_t off = 0, total = 0;
      for (int r = 0; r < me; ++r) off += counts[size_t(r)];
      for (const int64_t c : counts) total += c;
      const int64_t mine_n = counts[size_t(me)];
      auto full = values(seed_, me, ++salt, total);
      const auto full_bytes = to_bytes(full, t);
      std::vector<float> ref(static_cast<size_t>(mine_n));
      host_->reduce_scatter_v(ref.data(), full.data(), counts);

      Bytes dfull(full_bytes), dmine(size_t(mine_n) * es);
      dmine.poison();
      dev_->reduce_scatter_v(dmine.get(), dfull.get(), counts, t, stream_);
      sync();
      expect_close(from_bytes(dmine.download(), t, 0, mine_n), ref, t, n, what);
      EXPECT_TRUE(test::bit_equal(dfull.download(), full_bytes)) << "the input changed, " << what;

      // In place: the result overwrites this rank's piece of full.
      Bytes dfull2(full_bytes);
      dev_->reduce_scatter_v(dfull2.get() + size_t(off) * es, dfull2.get(), counts, t, stream_);
      sync();
      expect_close(from_bytes(dfull2.download(), t, off, mine_n), ref, t, n, "in place, " + what);
    }
  }
}

TEST_F(DeviceCommMpi, AllReduceMatchesMpi) {
  const int n = host_->size(), me = host_->rank();
  uint64_t salt = 200;
  for (const DType t : kDtypes) {
    for (const int64_t count : {int64_t{0}, int64_t{1}, int64_t{1001}, (int64_t{1} << 20) + 3}) {
      const std::string what = std::string(dtype_name(t)) + ", count " + std::to_string(count);
      auto data = values(seed_, me, ++salt, count);
      const auto bytes = to_bytes(data, t);
      std::vector<float> ref = data;
      host_->all_reduce_sum(ref.data(), ref.size());
      Bytes d(bytes);
      dev_->all_reduce_sum(d.get(), count, t, stream_);
      sync();
      expect_close(from_bytes(d.download(), t, 0, count), ref, t, n, what);
    }
  }
  // fp64 (the gradient-norm path): against MpiComm's double sum.
  for (const int64_t count : {int64_t{1}, int64_t{4099}}) {
    const auto f = values(seed_, me, ++salt, count);
    std::vector<double> data(f.begin(), f.end()), ref = data;
    host_->all_reduce_sum(ref.data(), ref.size());
    DeviceBuffer<double> d(data);
    dev_->all_reduce_sum(d.get(), count, DType::F64, stream_);
    sync();
    expect_close(d.download(), ref, DType::F64, n, "f64, count " + std::to_string(count));
  }
}

// Misuse is refused on every rank before NCCL is called, so no rank is left waiting.
TEST_F(DeviceCommMpi, MisuseThrowsEverywhere) {
  const int n = host_->size();
  DeviceBuffer<float> buf(64);
  EXPECT_THROW(dev_->all_gather_v(buf.get(), buf.get(), std::vector<int64_t>(size_t(n) + 1, 1), DType::F32, stream_),
               InternalError);
  std::vector<int64_t> neg(size_t(n), 1);
  neg[0] = -1;
  EXPECT_THROW(dev_->reduce_scatter_v(buf.get(), buf.get(), neg, DType::F32, stream_), InternalError);
  // The communicator still works afterwards.
  DeviceBuffer<float> one(std::vector<float>{1.0f});
  dev_->all_reduce_sum(one.get(), 1, DType::F32, stream_);
  sync();
  EXPECT_EQ(one.download()[0], float(n));
}

}  // namespace
}  // namespace longtune
#endif  // LONGTUNE_HAVE_CUDA
