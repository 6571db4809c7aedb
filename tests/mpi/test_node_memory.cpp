// node_host_memory_per_numa (src/train/node_memory.hpp) under mpirun: every rank of this one-host
// job touches its own buffer, and the node figure must hold all of them (at least the sum of the
// buffers) and about the sum of what each rank sees of itself.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/memory/host_memory.hpp"
#include "src/train/node_memory.hpp"

namespace longtune {
namespace {

TEST(NodeMemoryMpi, SumsTheRanksOfRankZerosHost) {
  std::unique_ptr<Comm> comm = make_comm();
  const size_t bytes = size_t(64) << 20;
  std::vector<char> buffer(bytes);
  std::memset(buffer.data(), 1 + comm->rank(), bytes);  // resident
  const NumaUsage own = host_memory_per_node();
  if (!own.available) GTEST_SKIP() << "no /proc/self/numa_maps";
  double own_total[1] = {double(own.total())};
  comm->all_reduce_sum(own_total, 1);
  int ranks = 0;
  const NumaUsage node = node_host_memory_per_numa(*comm, &ranks);
  EXPECT_TRUE(node.available);
  EXPECT_EQ(ranks, comm->size());  // one host
  EXPECT_GE(double(node.total()), double(bytes) * comm->size());
  // Read moments apart: the processes may grow a little in between.
  EXPECT_NEAR(double(node.total()), own_total[0], 0.1 * own_total[0]);
  EXPECT_GT(buffer[bytes - 1], 0);
}

}  // namespace
}  // namespace longtune
