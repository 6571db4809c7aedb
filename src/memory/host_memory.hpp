// NUMA-placed host memory for the offloaded optimizer state (fp32 master weights, AdamW moments,
// gradient and compute-dtype staging buffers of one rank).
//
// A HostArena is ONE flat anonymous mapping per rank:
//  - mmap(MAP_PRIVATE | MAP_ANONYMOUS): page-aligned base, size rounded up to whole pages, so the
//    whole arena can later be pinned with a single cudaHostRegister(data(), size(), ...) in place,
//    without a second copy. Pinning faults every page in, so register only after the policy is set
//    (the constructor does that) and preferably after first_touch().
//  - the NUMA policy is applied with mbind() before any page is touched, so it decides where every
//    page lands: bind to one node (default: the node of the rank's GPU when the caller knows it,
//    else the node of the CPUs this process may run on), interleave over the process's allowed
//    memory nodes, or weighted interleave (Linux >= 6.9, weights from
//    /sys/kernel/mm/mempolicy/weighted_interleave/), falling back to plain interleave with a
//    one-line notice when the kernel rejects it.
//  - madvise(MADV_HUGEPAGE) (transparent huge pages) unless disabled: fewer TLB misses for the
//    optimizer's streaming passes; a kernel without THP only gets a notice.
//  - first_touch() faults the pages in parallel with the optimizer's static thread split
//    (src/optim/kokkos_views.hpp): thread t touches the same contiguous fraction of an array that
//    it later updates. With a bind/interleave policy placement does not depend on the touching
//    thread; with NumaPolicy::None (kernel default, local allocation) it does.
// On a machine without NUMA support (numa_available() < 0) the arena is plain page-aligned memory
// and a notice says so once per process.
// Every failing mmap/mbind/madvise/libnuma call throws NumaError naming the call and errno's text.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace longtune {

enum class NumaPolicy {
  Bind,                // all pages on one node (MPOL_BIND)
  Interleave,          // round-robin over the allowed nodes (MPOL_INTERLEAVE)
  WeightedInterleave,  // round-robin weighted by the kernel's per-node weights (MPOL_WEIGHTED_INTERLEAVE)
  None,                // no mbind: the kernel's default (local first touch)
};

struct NumaPlacement {
  NumaPolicy policy = NumaPolicy::Bind;
  // Bind only: the node; -1 picks home_numa_node(). Pass numa_node_of_pci_device(<GPU bus id>)
  // when the rank's GPU is known.
  int node = -1;
  bool huge_pages = true;  // madvise(MADV_HUGEPAGE)
};

// Parses "bind", "bind:<node>", "interleave", "weighted-interleave" or "none" (ConfigError otherwise).
NumaPlacement parse_numa_placement(const std::string& text);
std::string_view numa_policy_name(NumaPolicy p);  // "bind", "interleave", "weighted-interleave", "none"

// True when libnuma works on this machine (numa_available() >= 0).
bool numa_supported();
// True when the running kernel offers weighted interleave (/sys/kernel/mm/mempolicy/weighted_interleave).
bool weighted_interleave_available();
// The NUMA node holding most of the CPUs this process may run on (sched_getaffinity; ties go to
// the node of the CPU running the caller). 0 without NUMA support.
int home_numa_node();
// The node of a PCI device from sysfs, e.g. numa_node_of_pci_device("0000:3B:00.0") with the
// bus id from cudaDeviceGetPCIBusId; -1 when unknown (no such file, or the kernel says -1).
int numa_node_of_pci_device(const std::string& bus_id);
// The system page size in bytes.
size_t page_size();
// bytes rounded up to a whole number of pages.
size_t round_up_to_pages(size_t bytes);
// MemAvailable of /proc/meminfo in bytes: what this node can still allocate without swapping
// (-1 where the kernel does not report it).
int64_t host_memory_available();

class HostArena {
 public:
  HostArena() = default;
  // Maps round_up_to_pages(bytes) bytes and applies `placement`. Pages are not touched yet.
  explicit HostArena(size_t bytes, const NumaPlacement& placement = {});
  ~HostArena();
  HostArena(HostArena&& other) noexcept;
  HostArena& operator=(HostArena&& other) noexcept;
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  std::byte* data() const { return base_; }
  size_t size() const { return size_; }  // a multiple of page_size()
  // The policy in force after fallbacks (None without NUMA support), and the bound node (-1 unless Bind).
  NumaPolicy policy() const { return policy_; }
  int node() const { return node_; }
  // One line for logs, e.g. "1.2 GiB bound to NUMA node 0, transparent huge pages".
  std::string describe() const;

  // Hands out the next `count` elements of T from the arena, aligned to `align` bytes (default:
  // a page, so arrays never share a page). Throws InternalError when the arena is too small.
  template <class T>
  T* carve(size_t count, size_t align = 0) {
    return static_cast<T*>(carve_bytes(count * sizeof(T), align));
  }
  void* carve_bytes(size_t bytes, size_t align = 0);
  size_t used() const { return used_; }
  // Bytes an arena needs for arrays of these byte sizes carved with the default alignment.
  static size_t bytes_for(const std::vector<size_t>& array_bytes);

  // Faults in every page of [p, p + bytes) (must lie inside the arena) without changing its
  // contents: in parallel, thread t taking the t-th contiguous share (Kokkos when initialized,
  // else OpenMP with a static schedule).
  void first_touch(const void* p, size_t bytes) const;
  void first_touch() const { first_touch(base_, size_); }

 private:
  void release() noexcept;
  std::byte* base_ = nullptr;
  size_t size_ = 0;
  size_t used_ = 0;
  NumaPolicy policy_ = NumaPolicy::None;
  int node_ = -1;
  bool huge_pages_ = false;
};

// Resident host memory per NUMA node, as `numastat -p <pid>` reports it: for each mapping in
// /proc/<pid>/numa_maps, N<node>=<pages> times the mapping's kernelpagesize_kB.
struct NumaUsage {
  bool available = false;       // false when numa_maps could not be read
  std::vector<uint64_t> bytes;  // index = node
  uint64_t total() const;
};
// Parses numa_maps text; only mappings whose start address lies in [begin, end) are counted.
NumaUsage parse_numa_maps(std::string_view text, uintptr_t begin = 0, uintptr_t end = UINTPTR_MAX);
// This process's usage (all mappings), or of the mappings that start inside [p, p + bytes).
NumaUsage host_memory_per_node();
NumaUsage host_memory_per_node(const void* p, size_t bytes);
// "host memory per NUMA node: node0 1234.5 MiB node1 0.0 MiB"
std::string format_numa_usage(const NumaUsage& usage);

}  // namespace longtune
