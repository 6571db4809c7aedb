// MpiComm under mpirun (registered for 1..4 ranks). Every collective runs on fresh random data
// (seed drawn by rank 0, broadcast) and is checked bit for bit against a reference each rank
// computes locally from every rank's inputs, which it can regenerate from the seed. Sums are
// compared bit-exactly: MpiComm promises the fixed order x_0 + x_1 + ... + x_{n-1}.
// Counts are uneven, with empty pieces; a second communicator with a tiny message limit runs the
// chunked large-count paths (the ones taken beyond INT_MAX elements) on small buffers.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/comm/mpi_comm.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

uint64_t shared_seed(Comm& c) {
  uint64_t seed = 0;
  if (c.rank() == 0) seed = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  c.broadcast(&seed, sizeof(seed), 0);
  return seed;
}

// Rank r's input for case `salt`: values of widely varying magnitude, so the summation order shows.
template <class T>
std::vector<T> input(uint64_t seed, int r, uint64_t salt, int64_t n) {
  std::mt19937_64 g(seed ^ (0x9e3779b97f4a7c15ULL * (static_cast<uint64_t>(r) + 1)) ^ (salt << 20));
  std::vector<T> v(static_cast<size_t>(n));
  if constexpr (std::is_integral_v<T>) {
    std::uniform_int_distribution<int64_t> d(-(int64_t{1} << 50), int64_t{1} << 50);
    for (auto& x : v) x = d(g);
  } else {
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    std::uniform_int_distribution<int> e(-12, 12);
    for (auto& x : v) x = static_cast<T>(std::ldexp(u(g), e(g)));
  }
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

int64_t sum_of(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (auto x : v) s += x;
  return s;
}

// Uneven count patterns for `n` ranks, zero-length pieces included.
std::vector<std::vector<int64_t>> count_patterns(int n, uint64_t seed, bool large) {
  std::vector<std::vector<int64_t>> p;
  p.emplace_back(n, 0);                                             // all empty
  std::vector<int64_t> a(n), b(n), c(n, 0), d(n);
  for (int r = 0; r < n; ++r) {
    a[r] = r % 2 == 0 ? 0 : 3 + 11 * r;                             // every other piece empty
    b[r] = 1 + 7 * r;
  }
  c[n - 1] = 1000;                                                  // one rank holds everything
  std::mt19937_64 g(seed);
  for (int r = 0; r < n; ++r) d[r] = g() % 4 == 0 ? 0 : static_cast<int64_t>(g() % 300);
  p.push_back(a);
  p.push_back(b);
  p.push_back(c);
  p.push_back(d);
  if (large) {
    std::vector<int64_t> e(n);
    for (int r = 0; r < n; ++r) e[r] = r == 1 ? 0 : 70001 + 13 * r;  // several tiles, chunks
    p.push_back(e);
  }
  return p;
}

void check_all_gather(MpiComm& c, uint64_t seed, bool large) {
  const int n = c.size(), me = c.rank();
  uint64_t salt = 1;
  for (const auto& counts : count_patterns(n, seed, large)) {
    ++salt;
    std::vector<int64_t> off(n + 1, 0);
    for (int r = 0; r < n; ++r) off[r + 1] = off[r] + counts[r];
    std::vector<float> expect;
    for (int r = 0; r < n; ++r) {
      const auto piece = input<float>(seed, r, salt, counts[r]);
      expect.insert(expect.end(), piece.begin(), piece.end());
    }
    const auto mine = input<float>(seed, me, salt, counts[me]);
    std::vector<float> full(static_cast<size_t>(off[n]), -12345.f);
    c.all_gather_v(full.data(), mine.data(), counts);
    EXPECT_TRUE(same_bits(full, expect)) << "pattern " << salt;
    // In place: `mine` is full's own piece.
    std::vector<float> full2(static_cast<size_t>(off[n]), -1.f);
    std::copy(mine.begin(), mine.end(), full2.begin() + off[me]);
    c.all_gather_v(full2.data(), full2.data() + off[me], counts);
    EXPECT_TRUE(same_bits(full2, expect)) << "in place, pattern " << salt;
  }
}

void check_reduce_scatter(MpiComm& c, uint64_t seed, bool large) {
  const int n = c.size(), me = c.rank();
  uint64_t salt = 100;
  for (const auto& counts : count_patterns(n, seed, large)) {
    ++salt;
    const int64_t total = sum_of(counts);
    int64_t my_off = 0;
    for (int r = 0; r < me; ++r) my_off += counts[r];
    // Reference: my piece of every rank's full buffer, summed in rank order.
    std::vector<float> expect(static_cast<size_t>(counts[me]));
    for (int r = 0; r < n; ++r) {
      const auto fr = input<float>(seed, r, salt, total);
      for (int64_t i = 0; i < counts[me]; ++i)
        expect[i] = r == 0 ? fr[my_off + i] : expect[i] + fr[my_off + i];
    }
    const auto full = input<float>(seed, me, salt, total);
    std::vector<float> mine(static_cast<size_t>(counts[me]), -7.f);
    c.reduce_scatter_v(mine.data(), full.data(), counts);
    EXPECT_TRUE(same_bits(mine, expect)) << "pattern " << salt;
    // Determinism: repeated calls give the same bits.
    for (int rep = 0; rep < 2; ++rep) {
      std::vector<float> again(mine.size(), 0.f);
      c.reduce_scatter_v(again.data(), full.data(), counts);
      EXPECT_TRUE(same_bits(again, mine)) << "repeat " << rep << ", pattern " << salt;
    }
    // In place: the result overwrites full's own piece.
    auto inplace = full;
    c.reduce_scatter_v(inplace.data() + my_off, inplace.data(), counts);
    EXPECT_TRUE(same_bits(std::vector<float>(inplace.begin() + my_off, inplace.begin() + my_off + counts[me]), expect))
        << "in place, pattern " << salt;
  }
}

template <class T>
void check_all_reduce_sum(MpiComm& c, uint64_t seed, const std::vector<int64_t>& sizes) {
  const int n = c.size(), me = c.rank();
  uint64_t salt = 200;
  for (const int64_t count : sizes) {
    ++salt;
    std::vector<T> expect(static_cast<size_t>(count));
    for (int r = 0; r < n; ++r) {
      const auto v = input<T>(seed, r, salt, count);
      for (int64_t i = 0; i < count; ++i) expect[i] = r == 0 ? v[i] : static_cast<T>(expect[i] + v[i]);
    }
    const auto in = input<T>(seed, me, salt, count);
    auto data = in;
    c.all_reduce_sum(data.data(), data.size());
    EXPECT_TRUE(same_bits(data, expect)) << "count " << count;
    auto again = in;
    c.all_reduce_sum(again.data(), again.size());
    EXPECT_TRUE(same_bits(again, data)) << "repeat, count " << count;
  }
}

class CommMpi : public ::testing::Test {
 protected:
  void SetUp() override {
    comm_ = std::make_unique<MpiComm>();
    chunked_ = std::make_unique<MpiComm>();
    chunked_->set_max_message_elems(7);
    seed_ = shared_seed(*comm_);
  }
  std::unique_ptr<MpiComm> comm_, chunked_;
  uint64_t seed_ = 0;
};

TEST_F(CommMpi, RankSizeLocal) {
  int world_rank = -1, world_size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  EXPECT_EQ(comm_->backend(), "mpi");
  EXPECT_EQ(comm_->rank(), world_rank);
  EXPECT_EQ(comm_->size(), world_size);
  // Every rank of the test runs on this one machine.
  EXPECT_EQ(comm_->local_size(), comm_->size());
  EXPECT_EQ(comm_->local_rank(), comm_->rank());
  std::vector<int64_t> lr = {comm_->local_rank()};
  comm_->all_reduce_sum(lr.data(), 1);
  EXPECT_EQ(lr[0], int64_t{comm_->size()} * (comm_->size() - 1) / 2);  // local ranks 0..n-1
  const auto made = make_comm();  // MPI is initialized here: make_comm must pick MPI
  EXPECT_EQ(made->backend(), "mpi");
  EXPECT_EQ(made->rank(), world_rank);
  EXPECT_EQ(made->size(), world_size);
  made->barrier();
}

TEST_F(CommMpi, BroadcastBlob) {
  for (MpiComm* c : {comm_.get(), chunked_.get()}) {
    for (int root = 0; root < c->size(); ++root) {
      std::mt19937_64 g(seed_ + static_cast<uint64_t>(root));
      std::vector<unsigned char> expect(1001 + 37 * static_cast<size_t>(root));
      for (auto& b : expect) b = static_cast<unsigned char>(g());
      std::vector<unsigned char> blob = c->rank() == root ? expect : std::vector<unsigned char>(expect.size(), 0);
      c->broadcast(blob.data(), blob.size(), root);
      EXPECT_EQ(blob, expect) << "root " << root;
    }
    c->broadcast(nullptr, 0, 0);
  }
}

TEST_F(CommMpi, AllGatherV) { check_all_gather(*comm_, seed_, true); }
TEST_F(CommMpi, AllGatherVChunked) { check_all_gather(*chunked_, seed_, false); }

TEST_F(CommMpi, ReduceScatterV) { check_reduce_scatter(*comm_, seed_, true); }
TEST_F(CommMpi, ReduceScatterVChunked) { check_reduce_scatter(*chunked_, seed_, false); }

TEST_F(CommMpi, AllReduceSum) {
  // 70001 elements: past the Allgather path, through reduce-scatter + all-gather.
  const std::vector<int64_t> sizes = {0, 1, 3, 1000, 70001};
  check_all_reduce_sum<double>(*comm_, seed_, sizes);
  check_all_reduce_sum<float>(*comm_, seed_, sizes);
  check_all_reduce_sum<int64_t>(*comm_, seed_, sizes);
}

TEST_F(CommMpi, AllReduceSumChunked) {
  const std::vector<int64_t> sizes = {0, 1, 5, 333};
  check_all_reduce_sum<double>(*chunked_, seed_, sizes);
  check_all_reduce_sum<float>(*chunked_, seed_, sizes);
  check_all_reduce_sum<int64_t>(*chunked_, seed_, sizes);
}

TEST_F(CommMpi, AllReduceSumSameBitsOnEveryPath) {
  // Small arrays use Allgather, large ones reduce-scatter + all-gather: same order, same bits.
  const auto in = input<float>(seed_, comm_->rank(), 7, 1000);
  auto a = in, b = in;
  comm_->all_reduce_sum(a.data(), a.size());
  chunked_->all_reduce_sum(b.data(), b.size());
  EXPECT_TRUE(same_bits(a, b));
}

TEST_F(CommMpi, AllReduceMax) {
  const int n = comm_->size(), me = comm_->rank();
  for (MpiComm* c : {comm_.get(), chunked_.get()}) {
    for (const int64_t count : {int64_t{0}, int64_t{4}, int64_t{70001}}) {
      if (c == chunked_.get() && count > 1000) continue;
      std::vector<double> expect(static_cast<size_t>(count), -std::numeric_limits<double>::infinity());
      for (int r = 0; r < n; ++r) {
        const auto v = input<double>(seed_, r, 300, count);
        for (int64_t i = 0; i < count; ++i) expect[i] = std::max(expect[i], v[i]);
      }
      auto data = input<double>(seed_, me, 300, count);
      c->all_reduce_max(data.data(), data.size());
      EXPECT_TRUE(same_bits(data, expect)) << "count " << count;
    }
    // A NaN on the last rank reaches every rank; so does an infinity.
    std::vector<double> flags = {0.0, 1.0, 2.0};
    if (me == n - 1) {
      flags[0] = std::nan("");
      flags[1] = std::numeric_limits<double>::infinity();
    }
    c->all_reduce_max(flags.data(), flags.size());
    EXPECT_TRUE(std::isnan(flags[0]));
    EXPECT_EQ(flags[1], std::numeric_limits<double>::infinity());
    EXPECT_EQ(flags[2], 2.0);
  }
}

TEST_F(CommMpi, BadArgumentsThrowWithoutDeadlock) {
  const int n = comm_->size();
  std::vector<float> a(64, 1.f), b(64, 1.f);
  std::vector<int64_t> wrong_len(static_cast<size_t>(n) + 1, 1);
  try {
    comm_->all_gather_v(a.data(), b.data(), wrong_len);
    ADD_FAILURE() << "no exception";
  } catch (const InternalError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("counts (one per rank)"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  EXPECT_THROW(comm_->reduce_scatter_v(a.data(), b.data(), std::vector<int64_t>(n + 2, 1)), InternalError);
  std::vector<int64_t> negative(static_cast<size_t>(n), 1);
  negative[0] = -1;
  EXPECT_THROW(comm_->reduce_scatter_v(a.data(), b.data(), negative), InternalError);
  EXPECT_THROW(comm_->broadcast(a.data(), 4, n), InternalError);
  EXPECT_THROW(comm_->broadcast(a.data(), 4, -1), InternalError);
  // The communicator still works afterwards: nobody was left inside a collective.
  comm_->barrier();
  std::vector<int64_t> one = {1};
  comm_->all_reduce_sum(one.data(), 1);
  EXPECT_EQ(one[0], n);
}

TEST_F(CommMpi, MpiErrorNamesTheCall) {
  // A call MPI rejects (root out of range; Open MPI and MPICH check arguments by default)
  // comes back as MpiError thanks to MPI_ERRORS_RETURN, on every rank, without communication.
  char byte = 0;
  try {
    LT_MPI_CHECK(MPI_Bcast(&byte, 1, MPI_BYTE, comm_->size() + 5, comm_->comm()));
    ADD_FAILURE() << "no exception";
  } catch (const MpiError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("MPI_Bcast(&byte, 1, MPI_BYTE"), std::string::npos) << msg;
    EXPECT_NE(msg.find(mpi_error_string(MPI_ERR_ROOT)), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  comm_->barrier();
}

}  // namespace
}  // namespace longtune
