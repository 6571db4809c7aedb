#include "src/optim/kokkos_scope.hpp"

#include <Kokkos_Core.hpp>

#include "src/common/error.hpp"

namespace longtune {

namespace {
bool g_finalized = false;  // Kokkos 3.4 has no is_finalized(); remember it ourselves
}

KokkosScope::KokkosScope(int num_threads) {
  if (Kokkos::is_initialized()) return;
  if (g_finalized)
    throw InternalError(
        "KokkosScope: Kokkos was already finalized in this process and cannot be initialized again; "
        "keep one KokkosScope alive for the whole program");
#if KOKKOS_VERSION >= 30700
  Kokkos::InitializationSettings settings;
  if (num_threads > 0) settings.set_num_threads(num_threads);
  // Thread binding is the job script's business (jobs/*.slurm set OMP_PROC_BIND/OMP_PLACES);
  // Kokkos' advice about it would only clutter every run's output.
  settings.set_disable_warnings(true);
  Kokkos::initialize(settings);
#else
  Kokkos::InitArguments args;
  args.num_threads = num_threads > 0 ? num_threads : -1;
  // Thread binding is the job script's business (jobs/*.slurm set OMP_PROC_BIND/OMP_PLACES);
  // Kokkos' advice about it would only clutter every run's output.
  args.disable_warnings = true;
  Kokkos::initialize(args);
#endif
  owns_ = true;
}

KokkosScope::~KokkosScope() {
  if (!owns_) return;
  Kokkos::finalize();
  g_finalized = true;
}

int KokkosScope::concurrency() { return Kokkos::DefaultHostExecutionSpace::concurrency(); }

}  // namespace longtune
