// Device memory for the GPU engine: one cudaMalloc per arena, carved by a bump allocator, so the
// whole footprint is decided (and refused, if it cannot fit) before the first step, and the peak
// is known exactly. Pinned host staging buffers for the per-micro-batch uploads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace longtune::gpu {

// Bytes rounded up to the arena's alignment (256: cuBLASLt and 16-byte vector loads are happy).
constexpr size_t kDeviceAlign = 256;
constexpr size_t align_up(size_t n) { return (n + kDeviceAlign - 1) / kDeviceAlign * kDeviceAlign; }

// Counts bytes first (plan), then hands out pieces of one allocation (carve). The same sequence of
// take() calls in both passes gives the same layout.
class DeviceArena {
 public:
  DeviceArena() = default;
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // Allocates `bytes` on the current device; throws ConfigError naming `what` and the free memory
  // when it does not fit.
  void allocate(size_t bytes, const std::string& what);
  // Next piece of `bytes` (aligned). Throws InternalError past the end.
  void* take(size_t bytes);
  template <typename T> T* take_n(int64_t n) { return static_cast<T*>(take(size_t(n) * sizeof(T))); }
  void reset() { used_ = 0; }
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }

 private:
  char* base_ = nullptr;
  size_t capacity_ = 0, used_ = 0;
};

// Page-locked host memory (cudaHostAlloc) for asynchronous uploads.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Free and total memory of the current device.
struct DeviceMemoryInfo {
  size_t free = 0, total = 0;
};
DeviceMemoryInfo device_memory_info();
// --gpu-mem-limit: makes the current GPU look like one of `limit` bytes by allocating the rest once
// (a ballast held for the process's life), so every later allocation -- ours, cuBLAS's, NCCL's --
// meets the smaller card's limit for real; device_memory_info() then reports the emulated total.
// No effect when limit >= the GPU's memory. ConfigError when the GPU has too little free memory.
void limit_device_memory(size_t limit);
std::string format_bytes(double bytes);  // "12.3 GiB"
// An engine's start: ConfigError "GPU memory: this run needs <plan>, the GPU has <free> free of
// <total> (<hints>)" when `needed` bytes exceed the free device memory; else the bytes already in use
// (the baseline its peak is measured above).
size_t check_device_memory(size_t needed, const std::string& plan, const std::string& hints);

}  // namespace longtune::gpu
