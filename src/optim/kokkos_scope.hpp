// Kokkos lifetime. Kokkos must be initialized once per process before any kernel runs, and
// Kokkos 3.4 cannot be initialized again after Kokkos::finalize(). A KokkosScope initializes
// Kokkos when nothing has yet, and finalizes it in its destructor only if it was the one that
// initialized it; scopes created while Kokkos is already up do nothing. Keep the outermost scope
// alive for the whole program (main(), or a gtest global environment in tests).
#pragma once

namespace longtune {

class KokkosScope {
 public:
  // num_threads <= 0: the OpenMP default (OMP_NUM_THREADS, else all cores of the process).
  // Throws InternalError when this process already finalized Kokkos (it cannot start again).
  explicit KokkosScope(int num_threads = -1);
  ~KokkosScope();
  KokkosScope(const KokkosScope&) = delete;
  KokkosScope& operator=(const KokkosScope&) = delete;

  // True when this scope initialized Kokkos and will finalize it.
  bool owns() const { return owns_; }
  // Threads of the default host execution space (Kokkos::OpenMP).
  static int concurrency();

 private:
  bool owns_ = false;
};

}  // namespace longtune
