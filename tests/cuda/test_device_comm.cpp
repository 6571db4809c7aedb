// DeviceComm's single backend (one rank, no NCCL; src/gpu/device_comm.hpp): the collectives of one
// rank move exactly the right bytes (random bit patterns, so NaN payloads must survive too), in
// place and not, with an empty piece; misuse (wrong number of counts, overlapping buffers) throws
// InternalError. The NCCL backend is tested under mpirun: tests/mpi/test_device_comm_mpi.cpp.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/common/error.hpp"
#include "src/gpu/device_comm.hpp"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

std::vector<unsigned char> random_bytes(size_t n, std::mt19937& rng) {
  std::vector<unsigned char> v(n);
  for (auto& b : v) b = static_cast<unsigned char>(rng());
  return v;
}

// The dtypes of the loops below (plain TEST_Fs, so --gtest_filter='DeviceComm*' selects them).
const DType kDtypes[] = {DType::F32, DType::BF16, DType::F16, DType::F64};

class DeviceCommSingle : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    host_ = make_comm();  // SerialComm: no mpirun here
    ASSERT_EQ(host_->size(), 1);
    dev_ = gpu::make_device_comm(*host_);
    CUDA_CHECK(cudaStreamCreate(&stream_));  // blocking: ordered after the helpers' cudaMemcpy/cudaMemset
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  void sync() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  std::unique_ptr<Comm> host_;
  std::unique_ptr<gpu::DeviceComm> dev_;
  cudaStream_t stream_ = nullptr;
  std::mt19937 rng_{20240607};
};

TEST_F(DeviceCommSingle, Backend) {
  EXPECT_EQ(dev_->backend(), "single");
  EXPECT_EQ(dev_->rank(), 0);
  EXPECT_EQ(dev_->size(), 1);
}

TEST_F(DeviceCommSingle, AllGatherCopiesTheBytes) {
  for (const DType t : kDtypes) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    for (const int64_t count : {int64_t{1}, int64_t{7}, int64_t{4099}}) {
      const size_t bytes = size_t(count) * dtype_size(t);
      const auto src = random_bytes(bytes, rng_);
      DeviceBuffer<unsigned char> mine(src), full(bytes);
      poison_nan(full.get(), bytes);
      dev_->all_gather_v(full.get(), mine.get(), {count}, t, stream_);
      sync();
      EXPECT_TRUE(bit_equal(full.download(), src)) << "count " << count;
      // In place: the piece is already where it belongs; nothing may change.
      dev_->all_gather_v(full.get(), full.get(), {count}, t, stream_);
      sync();
      EXPECT_TRUE(bit_equal(full.download(), src)) << "in place, count " << count;
    }
  }
}

TEST_F(DeviceCommSingle, ReduceScatterCopiesTheBytes) {
  for (const DType t : kDtypes) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    for (const int64_t count : {int64_t{1}, int64_t{7}, int64_t{4099}}) {
      const size_t bytes = size_t(count) * dtype_size(t);
      const auto src = random_bytes(bytes, rng_);
      DeviceBuffer<unsigned char> full(src), mine(bytes);
      poison_nan(mine.get(), bytes);
      dev_->reduce_scatter_v(mine.get(), full.get(), {count}, t, stream_);
      sync();
      EXPECT_TRUE(bit_equal(mine.download(), src)) << "count " << count;
      EXPECT_TRUE(bit_equal(full.download(), src)) << "the input changed, count " << count;
      dev_->reduce_scatter_v(full.get(), full.get(), {count}, t, stream_);
      sync();
      EXPECT_TRUE(bit_equal(full.download(), src)) << "in place, count " << count;
    }
  }
}

TEST_F(DeviceCommSingle, AllReduceKeepsTheBytes) {
  for (const DType t : kDtypes) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const size_t bytes = 1001 * dtype_size(t);
    const auto src = random_bytes(bytes, rng_);
    DeviceBuffer<unsigned char> data(src);
    dev_->all_reduce_sum(data.get(), 1001, t, stream_);
    dev_->all_reduce_sum(data.get(), 0, t, stream_);
    sync();
    EXPECT_TRUE(bit_equal(data.download(), src));
  }
}

TEST_F(DeviceCommSingle, EmptyPieceTouchesNothing) {
  for (const DType t : kDtypes) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const size_t bytes = 64 * dtype_size(t);
    const auto src = random_bytes(bytes, rng_);
    DeviceBuffer<unsigned char> a(src), b(src);
    dev_->all_gather_v(a.get(), nullptr, {0}, t, stream_);
    dev_->reduce_scatter_v(nullptr, b.get(), {0}, t, stream_);
    dev_->all_gather_v(nullptr, nullptr, {0}, t, stream_);
    sync();
    EXPECT_TRUE(bit_equal(a.download(), src));
    EXPECT_TRUE(bit_equal(b.download(), src));
  }
}

TEST(DeviceCommSingleMisuse, Throws) {
  SKIP_WITHOUT_GPU();
  const auto host = make_comm();
  const auto dev = gpu::make_device_comm(*host);
  DeviceBuffer<float> buf(64);
  float* f = buf.get();
  // One count per rank.
  EXPECT_THROW(dev->all_gather_v(f, f, {4, 4}, DType::F32, nullptr), InternalError);
  EXPECT_THROW(dev->reduce_scatter_v(f, f, {}, DType::F32, nullptr), InternalError);
  EXPECT_THROW(dev->all_gather_v(f, f, {-1}, DType::F32, nullptr), InternalError);
  EXPECT_THROW(dev->all_reduce_sum(f, -1, DType::F32, nullptr), InternalError);
  // `mine` overlapping `full` without being its piece.
  EXPECT_THROW(dev->all_gather_v(f, f + 1, {8}, DType::F32, nullptr), InternalError);
  EXPECT_THROW(dev->reduce_scatter_v(f + 7, f, {8}, DType::F32, nullptr), InternalError);
  // Null buffers where bytes move.
  EXPECT_THROW(dev->all_gather_v(nullptr, f, {8}, DType::F32, nullptr), InternalError);
  EXPECT_THROW(dev->reduce_scatter_v(nullptr, f, {8}, DType::F32, nullptr), InternalError);
  EXPECT_THROW(dev->all_reduce_sum(nullptr, 8, DType::F32, nullptr), InternalError);
  // Disjoint pieces of the same allocation are fine.
  dev->all_gather_v(f, f + 8, {8}, DType::F32, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
