// The Kokkos types of the host-side optimizer, named once. Host arrays are plain pointers into
// the NUMA-bound HostArena (src/memory/host_memory.hpp); kernels see them as unmanaged Views.
#pragma once
#include <cstdint>

#include <Kokkos_Core.hpp>

namespace longtune {

// Kokkos::OpenMP in longtune builds (Kokkos::Serial when Kokkos has no threaded backend).
using HostExec = Kokkos::DefaultHostExecutionSpace;
using HostSerial = Kokkos::Serial;

// Unmanaged 1-D host Views over raw pointers (no allocation, no reference counting).
template <class T>
using HostArray = Kokkos::View<T*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
using HostF32 = HostArray<float>;
using HostConstF32 = HostArray<const float>;
using HostU16 = HostArray<uint16_t>;
using HostF64 = HostArray<double>;

// Static schedule: thread t gets one contiguous run of iterations, the same split for every kernel
// over the same count (the first-touch pass relies on it).
template <class Exec = HostExec>
using HostRange = Kokkos::RangePolicy<Exec, Kokkos::Schedule<Kokkos::Static>, Kokkos::IndexType<int64_t>>;

}  // namespace longtune
