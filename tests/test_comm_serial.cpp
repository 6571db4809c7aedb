// SerialComm: rank 0 of 1; collectives are copies or no-ops; misuse throws InternalError.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/comm/serial_comm.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

TEST(CommSerial, Identity) {
  SerialComm c;
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.local_rank(), 0);
  EXPECT_EQ(c.local_size(), 1);
  EXPECT_EQ(c.backend(), "serial");
  c.barrier();
}

TEST(CommSerial, ReductionsAreIdentity) {
  SerialComm c;
  std::vector<double> d = {1.5, -2.0, 3.25};
  std::vector<float> f = {0.1f, 0.2f};
  std::vector<int64_t> i = {int64_t{1} << 40, -7};
  c.all_reduce_sum(d.data(), d.size());
  c.all_reduce_sum(f.data(), f.size());
  c.all_reduce_sum(i.data(), i.size());
  EXPECT_EQ(d, (std::vector<double>{1.5, -2.0, 3.25}));
  EXPECT_EQ(f, (std::vector<float>{0.1f, 0.2f}));
  EXPECT_EQ(i, (std::vector<int64_t>{int64_t{1} << 40, -7}));
  c.all_reduce_max(d.data(), d.size());
  EXPECT_EQ(d, (std::vector<double>{1.5, -2.0, 3.25}));
  c.all_reduce_sum(static_cast<double*>(nullptr), 0);  // empty is fine
}

TEST(CommSerial, BroadcastFromRootZero) {
  SerialComm c;
  std::vector<unsigned char> blob = {1, 2, 3, 255};
  c.broadcast(blob.data(), blob.size(), 0);
  EXPECT_EQ(blob, (std::vector<unsigned char>{1, 2, 3, 255}));
  c.broadcast(nullptr, 0, 0);
  EXPECT_THROW(c.broadcast(blob.data(), blob.size(), 1), InternalError);
}

TEST(CommSerial, GatherAndScatterCopy) {
  SerialComm c;
  const std::vector<float> mine = {1.f, 2.f, 3.f};
  std::vector<float> full(3, 0.f);
  c.all_gather_v(full.data(), mine.data(), {3});
  EXPECT_EQ(full, mine);
  std::vector<float> out(3, 0.f);
  c.reduce_scatter_v(out.data(), full.data(), {3});
  EXPECT_EQ(out, mine);
  // In place (mine is full's own piece) and empty pieces.
  c.all_gather_v(full.data(), full.data(), {3});
  c.reduce_scatter_v(full.data(), full.data(), {3});
  EXPECT_EQ(full, mine);
  c.all_gather_v(nullptr, nullptr, {0});
  c.reduce_scatter_v(nullptr, nullptr, {0});
}

TEST(CommSerial, BadCountsThrow) {
  SerialComm c;
  std::vector<float> a(4), b(4);
  EXPECT_THROW(c.all_gather_v(a.data(), b.data(), {2, 2}), InternalError);
  EXPECT_THROW(c.reduce_scatter_v(a.data(), b.data(), {}), InternalError);
  EXPECT_THROW(c.reduce_scatter_v(a.data(), b.data(), {-1}), InternalError);
}

TEST(CommSerial, MakeCommWithoutLauncherIsSerial) {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS"})
    if (std::getenv(var) != nullptr) GTEST_SKIP() << var << " is set: started by a launcher";
  const auto c = make_comm();
  EXPECT_EQ(c->backend(), "serial");
  EXPECT_EQ(c->size(), 1);
}

}  // namespace
}  // namespace longtune
