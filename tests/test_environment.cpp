// Process-wide test setup. Kokkos 3.4 cannot initialize again after finalize, so one KokkosScope
// lives for the whole test program in a gtest global environment; code under test that creates
// its own KokkosScope (the Trainer) finds Kokkos running and leaves it alone.
#include <gtest/gtest.h>

#include <memory>

#include "src/optim/kokkos_scope.hpp"

namespace {

class KokkosEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { scope_ = std::make_unique<longtune::KokkosScope>(); }
  void TearDown() override { scope_.reset(); }

 private:
  std::unique_ptr<longtune::KokkosScope> scope_;
};

[[maybe_unused]] ::testing::Environment* const kKokkosEnvironment =
    ::testing::AddGlobalTestEnvironment(new KokkosEnvironment);

}  // namespace
