#include "src/train/node_memory.hpp"

#include <unistd.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

namespace longtune {

namespace {

uint64_t host_id() {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0) return 0;
  return std::hash<std::string>{}(std::string(name));
}

}  // namespace

NumaUsage node_host_memory_per_numa(Comm& comm, int* ranks) {
  const NumaUsage mine = host_memory_per_node();
  uint64_t root_host = host_id();
  comm.broadcast(&root_host, sizeof root_host, 0);
  const bool counted = host_id() == root_host;
  // The node count, and whether every counted rank could read its numa_maps.
  double shape[2] = {double(mine.bytes.size()), counted && !mine.available ? 1.0 : 0.0};
  comm.all_reduce_max(shape, 2);
  std::vector<double> sums(size_t(shape[0]) + 1, 0.0);  // per node, then the rank count
  if (counted) {
    for (size_t n = 0; n < mine.bytes.size(); ++n) sums[n] = double(mine.bytes[n]);
    sums.back() = 1.0;
  }
  comm.all_reduce_sum(sums.data(), sums.size());
  NumaUsage out;
  out.available = shape[1] == 0.0;
  for (size_t n = 0; n + 1 < sums.size(); ++n) out.bytes.push_back(uint64_t(sums[n]));
  if (ranks) *ranks = int(sums.back());
  return out;
}

}  // namespace longtune
