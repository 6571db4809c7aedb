#include "src/memory/host_memory.hpp"

#include <numa.h>
#include <numaif.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "src/common/error.hpp"
#include "src/optim/kokkos_views.hpp"

// Linux >= 6.9; older headers lack it (numaif.h of libnuma 2.0.16 stops at MPOL_PREFERRED_MANY).
#ifndef MPOL_WEIGHTED_INTERLEAVE
#define MPOL_WEIGHTED_INTERLEAVE 6
#endif

namespace longtune {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

std::string human_bytes(uint64_t b) {
  char buf[64];
  if (b >= (uint64_t(1) << 30)) std::snprintf(buf, sizeof buf, "%.1f GiB", double(b) / double(1 << 30));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / double(1 << 20));
  return buf;
}

// Prints `message` on stderr the first time `flag` is raised in this process.
void notice_once(std::atomic<bool>& flag, const std::string& message) {
  if (!flag.exchange(true)) std::fprintf(stderr, "longtune: %s\n", message.c_str());
}
std::atomic<bool> g_no_numa_said{false}, g_no_weighted_said{false}, g_no_thp_said{false};

// libnuma's node mask of the memory nodes this process may use (its cpuset's mems).
struct NodeMask {
  bitmask* mask = nullptr;
  NodeMask() {
    mask = numa_get_mems_allowed();
    if (!mask) throw NumaError("numa_get_mems_allowed(): " + errno_text(errno));
  }
  ~NodeMask() { numa_bitmask_free(mask); }
  NodeMask(const NodeMask&) = delete;
  NodeMask& operator=(const NodeMask&) = delete;
  std::vector<int> nodes() const {
    std::vector<int> out;
    for (unsigned i = 0; i < mask->size; ++i)
      if (numa_bitmask_isbitset(mask, i)) out.push_back(int(i));
    return out;
  }
};

std::string node_list(const std::vector<int>& nodes) {
  std::string s;
  for (int n : nodes) s += (s.empty() ? "" : ",") + std::to_string(n);
  return s;
}

// mbind with a mask holding `nodes`; returns errno (0 on success).
int mbind_nodes(void* p, size_t bytes, int mode, const std::vector<int>& nodes) {
  bitmask* mask = numa_allocate_nodemask();
  if (!mask) return ENOMEM;
  for (int n : nodes) numa_bitmask_setbit(mask, unsigned(n));
  // The kernel reads maxnode - 1 bits (libnuma passes size + 1 too).
  const long rc = mbind(p, bytes, mode, mask->maskp, mask->size + 1, 0);
  const int err = rc == 0 ? 0 : errno;
  numa_bitmask_free(mask);
  return err;
}

}  // namespace

// ---- small queries -----------------------------------------------------------------------------

std::string_view numa_policy_name(NumaPolicy p) {
  switch (p) {
    case NumaPolicy::Bind: return "bind";
    case NumaPolicy::Interleave: return "interleave";
    case NumaPolicy::WeightedInterleave: return "weighted-interleave";
    case NumaPolicy::None: return "none";
  }
  return "?";
}

NumaPlacement parse_numa_placement(const std::string& text) {
  NumaPlacement p;
  if (text == "bind") return p;
  if (text.rfind("bind:", 0) == 0) {
    const std::string num = text.substr(5);
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(num.c_str(), &end, 10);
    if (num.empty() || *end != '\0' || errno != 0 || v < 0 || v > 4095)
      throw ConfigError("--numa: expected bind:<node number>, got '" + text + "'");
    p.node = int(v);
    return p;
  }
  if (text == "interleave") p.policy = NumaPolicy::Interleave;
  else if (text == "weighted-interleave") p.policy = NumaPolicy::WeightedInterleave;
  else if (text == "none") p.policy = NumaPolicy::None;
  else
    throw ConfigError("--numa: expected bind, bind:<node>, interleave, weighted-interleave or none, got '" +
                      text + "'");
  return p;
}

bool numa_supported() { return numa_available() >= 0; }

bool weighted_interleave_available() {
  std::error_code ec;
  return std::filesystem::exists("/sys/kernel/mm/mempolicy/weighted_interleave", ec);
}

size_t page_size() {
  static const size_t ps = [] {
    const long v = sysconf(_SC_PAGESIZE);
    return v > 0 ? size_t(v) : size_t(4096);
  }();
  return ps;
}

int64_t host_memory_available() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  int64_t kb = 0;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return -1;
}

size_t round_up_to_pages(size_t bytes) {
  const size_t ps = page_size();
  return (bytes + ps - 1) / ps * ps;
}

int home_numa_node() {
  if (!numa_supported()) return 0;
  const int here = sched_getcpu();
  if (here < 0) throw NumaError("sched_getcpu(): " + errno_text(errno));
  const int here_node = numa_node_of_cpu(here);
  if (here_node < 0) throw NumaError("numa_node_of_cpu(" + std::to_string(here) + "): " + errno_text(errno));
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) throw NumaError("sched_getaffinity(): " + errno_text(errno));
  std::vector<int> count(size_t(numa_max_node()) + 1, 0);
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    const int n = numa_node_of_cpu(cpu);
    if (n >= 0 && size_t(n) < count.size()) ++count[size_t(n)];
  }
  int best = here_node;
  for (size_t n = 0; n < count.size(); ++n)
    if (count[n] > count[size_t(best)]) best = int(n);
  return best;
}

int numa_node_of_pci_device(const std::string& bus_id) {
  // cudaDeviceGetPCIBusId gives "0000:3B:00.0" (sometimes an 8-digit domain); sysfs wants
  // "0000:3b:00.0".
  unsigned domain = 0, bus = 0, dev = 0, fn = 0;
  if (std::sscanf(bus_id.c_str(), "%x:%x:%x.%x", &domain, &bus, &dev, &fn) != 4) return -1;
  char name[64];
  std::snprintf(name, sizeof name, "%04x:%02x:%02x.%x", domain & 0xffffu, bus, dev, fn);
  std::ifstream f(std::string("/sys/bus/pci/devices/") + name + "/numa_node");
  int node = -1;
  if (!(f >> node)) return -1;
  return node;
}

// ---- HostArena ---------------------------------------------------------------------------------

HostArena::HostArena(size_t bytes, const NumaPlacement& placement) {
  LT_CHECK(bytes > 0, "HostArena needs a positive size");
  size_ = round_up_to_pages(bytes);
  void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    size_ = 0;
    throw NumaError("mmap(" + human_bytes(bytes) + " anonymous): " + errno_text(err));
  }
  base_ = static_cast<std::byte*>(p);
  try {
    if (placement.huge_pages) {
      if (madvise(base_, size_, MADV_HUGEPAGE) == 0) {
        huge_pages_ = true;
      } else {
        const int err = errno;
        if (err != EINVAL) throw NumaError("madvise(MADV_HUGEPAGE, " + human_bytes(size_) + "): " + errno_text(err));
        notice_once(g_no_thp_said, "transparent huge pages are not available (madvise(MADV_HUGEPAGE): " +
                                       errno_text(err) + "); host arrays use normal pages");
      }
    }
    if (placement.policy == NumaPolicy::None) return;
    if (!numa_supported()) {
      notice_once(g_no_numa_said,
                  "no NUMA support on this machine (numa_available() < 0): host memory is plain page-aligned "
                  "memory without a NUMA policy");
      return;
    }
    const NodeMask allowed;
    const std::vector<int> nodes = allowed.nodes();
    if (nodes.empty()) throw NumaError("numa_get_mems_allowed(): no memory node is allowed for this process");
    switch (placement.policy) {
      case NumaPolicy::Bind: {
        const int node = placement.node >= 0 ? placement.node : home_numa_node();
        if (std::find(nodes.begin(), nodes.end(), node) == nodes.end())
          throw ConfigError("--numa: node " + std::to_string(node) + " is not one of this process's memory nodes (" +
                            node_list(nodes) + ")");
        if (const int err = mbind_nodes(base_, size_, MPOL_BIND, {node}))
          throw NumaError("mbind(MPOL_BIND, node " + std::to_string(node) + ", " + human_bytes(size_) +
                          "): " + errno_text(err));
        policy_ = NumaPolicy::Bind;
        node_ = node;
        return;
      }
      case NumaPolicy::WeightedInterleave: {
        int err = ENOENT;
        if (weighted_interleave_available()) err = mbind_nodes(base_, size_, MPOL_WEIGHTED_INTERLEAVE, nodes);
        if (err == 0) {
          policy_ = NumaPolicy::WeightedInterleave;
          return;
        }
        if (err != EINVAL && err != ENOENT)
          throw NumaError("mbind(MPOL_WEIGHTED_INTERLEAVE, nodes " + node_list(nodes) + ", " + human_bytes(size_) +
                          "): " + errno_text(err));
        notice_once(g_no_weighted_said,
                    err == ENOENT ? std::string("weighted interleave is not offered by this kernel (no "
                                                "/sys/kernel/mm/mempolicy/weighted_interleave, needs Linux >= 6.9); "
                                                "interleaving host memory evenly instead")
                                  : "mbind(MPOL_WEIGHTED_INTERLEAVE) rejected by the kernel (" + errno_text(err) +
                                        "); interleaving host memory evenly instead");
        [[fallthrough]];
      }
      case NumaPolicy::Interleave: {
        if (const int err = mbind_nodes(base_, size_, MPOL_INTERLEAVE, nodes))
          throw NumaError("mbind(MPOL_INTERLEAVE, nodes " + node_list(nodes) + ", " + human_bytes(size_) +
                          "): " + errno_text(err));
        policy_ = NumaPolicy::Interleave;
        return;
      }
      case NumaPolicy::None: return;
    }
  } catch (...) {
    release();
    throw;
  }
}

HostArena::~HostArena() { release(); }

void HostArena::release() noexcept {
  if (base_) munmap(base_, size_);  // cannot fail for a mapping we made; nothing to report in a destructor
  base_ = nullptr;
  size_ = used_ = 0;
}

HostArena::HostArena(HostArena&& o) noexcept
    : base_(std::exchange(o.base_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      used_(std::exchange(o.used_, 0)),
      policy_(o.policy_),
      node_(o.node_),
      huge_pages_(o.huge_pages_) {}

HostArena& HostArena::operator=(HostArena&& o) noexcept {
  if (this != &o) {
    release();
    base_ = std::exchange(o.base_, nullptr);
    size_ = std::exchange(o.size_, 0);
    used_ = std::exchange(o.used_, 0);
    policy_ = o.policy_;
    node_ = o.node_;
    huge_pages_ = o.huge_pages_;
  }
  return *this;
}

std::string HostArena::describe() const {
  std::string s = human_bytes(size_);
  switch (policy_) {
    case NumaPolicy::Bind: s += " bound to NUMA node " + std::to_string(node_); break;
    case NumaPolicy::Interleave: s += " interleaved over NUMA nodes"; break;
    case NumaPolicy::WeightedInterleave: s += " weighted-interleaved over NUMA nodes"; break;
    case NumaPolicy::None: s += " without NUMA policy"; break;
  }
  if (huge_pages_) s += ", transparent huge pages";
  return s;
}

void* HostArena::carve_bytes(size_t bytes, size_t align) {
  if (align == 0) align = page_size();
  LT_CHECK((align & (align - 1)) == 0, "carve alignment must be a power of two");
  const size_t start = (used_ + align - 1) / align * align;
  if (start > size_ || bytes > size_ - start)
    throw InternalError("HostArena::carve: " + std::to_string(bytes) + " bytes do not fit (" +
                        std::to_string(size_ - std::min(start, size_)) + " left of " + std::to_string(size_) + ")");
  used_ = start + bytes;
  return base_ + start;
}

size_t HostArena::bytes_for(const std::vector<size_t>& array_bytes) {
  size_t total = 0;
  for (size_t b : array_bytes) total += round_up_to_pages(b);
  return total;
}

void HostArena::first_touch(const void* p, size_t bytes) const {
  const auto* b = static_cast<const std::byte*>(p);
  LT_CHECK(b >= base_ && bytes <= size_ && size_t(b - base_) <= size_ - bytes, "first_touch outside the arena");
  if (bytes == 0) return;
  const size_t ps = page_size();
  // Page-granular: [first, last] pages that intersect [p, p + bytes).
  const uintptr_t first = reinterpret_cast<uintptr_t>(b) / ps;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(b) + bytes - 1) / ps;
  const int64_t pages = int64_t(last - first + 1);
  auto touch = [first, ps](int64_t i) {
    // Read and write back one byte: faults the page in for writing, keeps the contents.
    volatile char* q = reinterpret_cast<volatile char*>((first + uintptr_t(i)) * ps);
    *q = *q;
  };
  if (Kokkos::is_initialized()) {
    Kokkos::parallel_for("HostArena::first_touch", HostRange<>(0, pages), touch);
    Kokkos::fence();
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < pages; ++i) touch(i);
  }
}

// ---- numa_maps ---------------------------------------------------------------------------------

uint64_t NumaUsage::total() const {
  uint64_t t = 0;
  for (uint64_t b : bytes) t += b;
  return t;
}

NumaUsage parse_numa_maps(std::string_view text, uintptr_t begin, uintptr_t end) {
  NumaUsage u;
  u.available = true;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    const std::string line(text.substr(pos, eol - pos));
    pos = eol + 1;
    std::istringstream in(line);
    std::string tok;
    if (!(in >> tok)) continue;
    uintptr_t addr = 0;
    try {
      addr = uintptr_t(std::stoull(tok, nullptr, 16));
    } catch (const std::exception&) {
      continue;  // not a mapping line
    }
    if (addr < begin || addr >= end) continue;
    std::vector<std::pair<size_t, uint64_t>> pages;  // (node, pages)
    uint64_t page_kb = page_size() / 1024;
    while (in >> tok) {
      if (tok.size() > 2 && tok[0] == 'N' && std::isdigit(static_cast<unsigned char>(tok[1]))) {
        const size_t eq = tok.find('=');
        if (eq == std::string::npos) continue;
        pages.emplace_back(size_t(std::stoul(tok.substr(1, eq - 1))), std::stoull(tok.substr(eq + 1)));
      } else if (tok.rfind("kernelpagesize_kB=", 0) == 0) {
        page_kb = std::stoull(tok.substr(18));
      }
    }
    for (const auto& [node, n] : pages) {
      if (u.bytes.size() <= node) u.bytes.resize(node + 1, 0);
      u.bytes[node] += n * page_kb * 1024;
    }
  }
  return u;
}

static NumaUsage read_numa_maps(uintptr_t begin, uintptr_t end) {
  std::ifstream f("/proc/self/numa_maps");
  if (!f) return NumaUsage{};  // kernel without NUMA: nothing to report
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_numa_maps(ss.str(), begin, end);
}

NumaUsage host_memory_per_node() { return read_numa_maps(0, UINTPTR_MAX); }

NumaUsage host_memory_per_node(const void* p, size_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  return read_numa_maps(b, b + bytes);
}

std::string format_numa_usage(const NumaUsage& u) {
  std::string s = "host memory per NUMA node:";
  if (!u.available) return s + " unknown (no /proc/self/numa_maps)";
  if (u.bytes.empty()) return s + " none";
  char buf[64];
  for (size_t n = 0; n < u.bytes.size(); ++n) {
    std::snprintf(buf, sizeof buf, " node%zu %.1f MiB", n, double(u.bytes[n]) / double(1 << 20));
    s += buf;
  }
  return s;
}

}  // namespace longtune
