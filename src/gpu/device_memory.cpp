#include "src/gpu/device_memory.hpp"

#include <cuda_runtime.h>

#include <cstdio>

#include "kernels/cuda/cuda_check.cuh"
#include "src/common/error.hpp"

namespace longtune::gpu {

DeviceArena::~DeviceArena() {
  if (base_) cudaFree(base_);
}

void DeviceArena::allocate(size_t bytes, const std::string& what) {
  LT_CHECK(base_ == nullptr, "DeviceArena allocated twice");
  bytes = align_up(bytes);
  const DeviceMemoryInfo mem = device_memory_info();
  if (bytes > mem.free)
    throw ConfigError(what + ": needs " + format_bytes(double(bytes)) + " of GPU memory, the GPU has " +
                      format_bytes(double(mem.free)) + " free of " + format_bytes(double(mem.total)) +
                      " (shorter --seq-len, smaller --micro-batch, or --recompute layer)");
  const cudaError_t err = cudaMalloc(&base_, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of a failed allocation
    throw ConfigError(what + ": cudaMalloc of " + format_bytes(double(bytes)) + " failed: " + cudaGetErrorString(err));
  }
  capacity_ = bytes;
  used_ = 0;
}

void* DeviceArena::take(size_t bytes) {
  bytes = align_up(bytes);
  LT_CHECK(used_ + bytes <= capacity_, "DeviceArena: plan and carve disagree (" + std::to_string(used_ + bytes) +
                                           " > " + std::to_string(capacity_) + " bytes)");
  void* p = base_ + used_;
  used_ += bytes;
  return p;
}

PinnedBuffer::PinnedBuffer(size_t bytes) : bytes_(bytes) {
  CUDA_CHECK(cudaHostAlloc(&ptr_, bytes, cudaHostAllocDefault));
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_) cudaFreeHost(ptr_);
}

namespace {
void* g_ballast = nullptr;  // --gpu-mem-limit: the memory this process must not use
size_t g_ballast_bytes = 0;
}  // namespace

void limit_device_memory(size_t limit) {
  LT_CHECK(g_ballast == nullptr, "limit_device_memory called twice");
  size_t free = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free, &total));
  if (limit >= total) return;  // nothing to take away
  const size_t ballast = total - limit;
  if (ballast > free)
    throw ConfigError("--gpu-mem-limit " + format_bytes(double(limit)) + ": this GPU has only " +
                      format_bytes(double(free)) + " free of " + format_bytes(double(total)) +
                      ", so the cap cannot be emulated (other processes use " + format_bytes(double(total - free)) + ")");
  const cudaError_t err = cudaMalloc(&g_ballast, ballast);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw ConfigError("--gpu-mem-limit: cudaMalloc of the " + format_bytes(double(ballast)) +
                      " ballast failed: " + cudaGetErrorString(err));
  }
  g_ballast_bytes = ballast;
}

DeviceMemoryInfo device_memory_info() {
  DeviceMemoryInfo m;
  CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  m.total -= g_ballast_bytes;  // the emulated GPU (the ballast is already out of `free`)
  return m;
}

size_t check_device_memory(size_t needed, const std::string& plan, const std::string& hints) {
  const DeviceMemoryInfo mem = device_memory_info();
  if (needed > mem.free)
    throw ConfigError("GPU memory: this run needs " + plan + ", the GPU has " + format_bytes(double(mem.free)) +
                      " free of " + format_bytes(double(mem.total)) + " (" + hints + ")");
  return mem.total - mem.free;
}

std::string format_bytes(double bytes) {
  char buf[32];
  if (bytes >= double(1ull << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(1ull << 30));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / double(1ull << 20));
  return buf;
}

}  // namespace longtune::gpu
