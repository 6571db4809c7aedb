// Host memory per NUMA node of one machine of a job: the brief's "[RESULT] host memory per NUMA
// node" is a node figure, while /proc/self/numa_maps (host_memory_per_node) sees one process.
#pragma once
#include "src/comm/comm.hpp"
#include "src/memory/host_memory.hpp"

namespace longtune {

// The resident host memory per NUMA node of the ranks that share rank 0's host, summed over them
// (ranks on other hosts add nothing). Collective: every rank calls it; every rank gets the sum.
// `ranks` receives how many ranks were counted.
NumaUsage node_host_memory_per_numa(Comm& comm, int* ranks = nullptr);

}  // namespace longtune
