// NUMA-placed host arena and the numa_maps reader (src/memory/host_memory.hpp).
#include <gtest/gtest.h>
#include <numaif.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "src/common/error.hpp"
#include "src/memory/host_memory.hpp"

#ifndef MPOL_WEIGHTED_INTERLEAVE
#define MPOL_WEIGHTED_INTERLEAVE 6
#endif

namespace longtune {
namespace {

constexpr size_t kMiB = size_t(1) << 20;

// The policy mode of the mapping holding `addr`, or -1 when get_mempolicy fails.
int policy_of(const void* addr, unsigned long* nodemask) {
  int mode = -1;
  unsigned long mask[16] = {};
  if (get_mempolicy(&mode, mask, sizeof(mask) * 8, const_cast<void*>(addr), MPOL_F_ADDR) != 0) return -1;
  if (nodemask) *nodemask = mask[0];
  return mode;
}

TEST(HostMemory, PageAlignedRoundedAndWritable) {
  const size_t ps = page_size();
  HostArena a(3 * ps + 5, NumaPlacement{NumaPolicy::None, -1, false});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % ps, 0u);
  EXPECT_EQ(a.size(), 4 * ps);
  std::memset(a.data(), 0x5a, a.size());
  for (size_t i = 0; i < a.size(); i += 997) ASSERT_EQ(uint8_t(a.data()[i]), 0x5a);
  EXPECT_EQ(round_up_to_pages(1), ps);
  EXPECT_EQ(round_up_to_pages(ps), ps);
  EXPECT_EQ(round_up_to_pages(0), 0u);
}

TEST(HostMemory, CarveAlignsAndChecksSize) {
  const size_t ps = page_size();
  HostArena a(HostArena::bytes_for({100 * 4, 3 * ps, 10}), NumaPlacement{NumaPolicy::None, -1, false});
  EXPECT_EQ(a.size(), 5 * ps);
  float* x = a.carve<float>(100);
  std::byte* y = a.carve<std::byte>(3 * ps);
  uint16_t* z = a.carve<uint16_t>(5);
  EXPECT_EQ(reinterpret_cast<std::byte*>(x), a.data());
  EXPECT_EQ(y, a.data() + ps);
  EXPECT_EQ(reinterpret_cast<std::byte*>(z), a.data() + 4 * ps);
  EXPECT_THROW(a.carve<float>(ps), InternalError);
  float* w = a.carve<float>(4, 64);  // the rest of z's page, 64-byte aligned
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w) % 64, 0u);
}

TEST(HostMemory, MoveKeepsTheMapping) {
  HostArena a(kMiB, NumaPlacement{NumaPolicy::None, -1, false});
  std::byte* p = a.data();
  HostArena b(std::move(a));
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.data(), p);
  HostArena c;
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.size(), kMiB);
}

TEST(HostMemory, FirstTouchKeepsContents) {
  HostArena a(8 * kMiB);
  auto* v = a.carve<uint32_t>(2 * kMiB);
  for (uint32_t i = 0; i < 1000; ++i) v[i * 97] = i;
  a.first_touch();
  a.first_touch(v + 5, 12345);
  for (uint32_t i = 0; i < 1000; ++i) ASSERT_EQ(v[i * 97], i);
}

TEST(HostMemory, BindPolicyApplied) {
  if (!numa_supported()) GTEST_SKIP() << "no NUMA support on this machine";
  const int node = home_numa_node();
  HostArena a(4 * kMiB, NumaPlacement{NumaPolicy::Bind, -1, true});
  EXPECT_EQ(a.policy(), NumaPolicy::Bind);
  EXPECT_EQ(a.node(), node);
  unsigned long mask = 0;
  EXPECT_EQ(policy_of(a.data() + kMiB, &mask), MPOL_BIND);
  EXPECT_EQ(mask, 1ul << node);
  EXPECT_NE(a.describe().find("bound to NUMA node " + std::to_string(node)), std::string::npos) << a.describe();
}

TEST(HostMemory, InterleavePolicyApplied) {
  if (!numa_supported()) GTEST_SKIP() << "no NUMA support on this machine";
  HostArena a(4 * kMiB, NumaPlacement{NumaPolicy::Interleave, -1, false});
  EXPECT_EQ(a.policy(), NumaPolicy::Interleave);
  EXPECT_EQ(policy_of(a.data(), nullptr), MPOL_INTERLEAVE);
}

TEST(HostMemory, WeightedInterleaveOrFallback) {
  if (!numa_supported()) GTEST_SKIP() << "no NUMA support on this machine";
  HostArena a(4 * kMiB, NumaPlacement{NumaPolicy::WeightedInterleave, -1, false});
  const int mode = policy_of(a.data(), nullptr);
  if (a.policy() == NumaPolicy::WeightedInterleave) {
    EXPECT_TRUE(weighted_interleave_available());
    EXPECT_EQ(mode, MPOL_WEIGHTED_INTERLEAVE);
  } else {
    EXPECT_EQ(a.policy(), NumaPolicy::Interleave);  // fallback, announced on stderr
    EXPECT_EQ(mode, MPOL_INTERLEAVE);
  }
}

TEST(HostMemory, NoPolicyLeavesDefault) {
  if (!numa_supported()) GTEST_SKIP() << "no NUMA support on this machine";
  HostArena a(kMiB, NumaPlacement{NumaPolicy::None, -1, false});
  EXPECT_EQ(a.policy(), NumaPolicy::None);
  EXPECT_EQ(policy_of(a.data(), nullptr), MPOL_DEFAULT);
}

TEST(HostMemory, BadNodeIsAConfigError) {
  if (!numa_supported()) GTEST_SKIP() << "no NUMA support on this machine";
  EXPECT_THROW(HostArena(kMiB, NumaPlacement{NumaPolicy::Bind, 4000, false}), ConfigError);
}

TEST(HostMemory, ParsePlacement) {
  EXPECT_EQ(parse_numa_placement("bind").policy, NumaPolicy::Bind);
  EXPECT_EQ(parse_numa_placement("bind").node, -1);
  EXPECT_EQ(parse_numa_placement("bind:3").node, 3);
  EXPECT_EQ(parse_numa_placement("interleave").policy, NumaPolicy::Interleave);
  EXPECT_EQ(parse_numa_placement("weighted-interleave").policy, NumaPolicy::WeightedInterleave);
  EXPECT_EQ(parse_numa_placement("none").policy, NumaPolicy::None);
  EXPECT_THROW(parse_numa_placement("bind:x"), ConfigError);
  EXPECT_THROW(parse_numa_placement("bind:"), ConfigError);
  EXPECT_THROW(parse_numa_placement("spread"), ConfigError);
  EXPECT_EQ(numa_node_of_pci_device("not a bus id"), -1);
  EXPECT_EQ(numa_node_of_pci_device("0000:ff:1f.7"), -1);  // no such device (or no NUMA info)
}

TEST(HostMemory, ParsesNumaMaps) {
  const std::string text =
      "00400000 default file=/usr/bin/x mapped=10 N0=10 kernelpagesize_kB=4\n"
      "7f0000000000 bind:1 anon=512 dirty=512 N1=512 kernelpagesize_kB=4\n"
      "7f0000200000 interleave:0-1 anon=300 dirty=300 N0=100 N1=200 kernelpagesize_kB=4\n"
      "7f1000000000 default file=/dev/hugepages/x huge dirty=3 N0=1 N2=2 kernelpagesize_kB=2048\n"
      "7f2000000000 default stack\n"
      "garbage line\n";
  const NumaUsage u = parse_numa_maps(text);
  ASSERT_TRUE(u.available);
  ASSERT_EQ(u.bytes.size(), 3u);
  EXPECT_EQ(u.bytes[0], (10 + 100) * 4096ull + 2048 * 1024ull);
  EXPECT_EQ(u.bytes[1], (512 + 200) * 4096ull);
  EXPECT_EQ(u.bytes[2], 2 * 2048 * 1024ull);
  EXPECT_EQ(u.total(), u.bytes[0] + u.bytes[1] + u.bytes[2]);
  // Only the mappings starting inside [begin, end).
  const NumaUsage part = parse_numa_maps(text, 0x7f0000000000ull, 0x7f0000200001ull);
  ASSERT_EQ(part.bytes.size(), 2u);
  EXPECT_EQ(part.bytes[0], 100 * 4096ull);
  EXPECT_EQ(part.bytes[1], 712 * 4096ull);
  EXPECT_EQ(format_numa_usage(part), "host memory per NUMA node: node0 0.4 MiB node1 2.8 MiB");
  EXPECT_EQ(format_numa_usage(NumaUsage{}), "host memory per NUMA node: unknown (no /proc/self/numa_maps)");
}

TEST(HostMemory, UsageAfterTouchMatchesArena) {
  if (!numa_supported()) GTEST_SKIP() << "no NUMA support on this machine";
  const size_t bytes = 64 * kMiB;
  HostArena a(bytes, NumaPlacement{NumaPolicy::Bind, -1, true});
  const NumaUsage before = host_memory_per_node(a.data(), a.size());
  EXPECT_LT(before.total(), bytes / 8);
  a.first_touch();
  const NumaUsage after = host_memory_per_node(a.data(), a.size());
  ASSERT_TRUE(after.available);
  ASSERT_GT(after.bytes.size(), size_t(a.node()));
  EXPECT_GE(after.bytes[size_t(a.node())], bytes * 95 / 100) << format_numa_usage(after);
  EXPECT_LE(after.total(), bytes + 4 * kMiB) << format_numa_usage(after);
  const NumaUsage all = host_memory_per_node();
  EXPECT_GE(all.total(), after.total());
  EXPECT_NE(format_numa_usage(all).find("node" + std::to_string(a.node()) + " "), std::string::npos);
}

}  // namespace
}  // namespace longtune
