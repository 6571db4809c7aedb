// Where test data lives. The compiled-in default is the source tree; LONGTUNE_FIXTURE_DIR in the
// environment overrides it (the GPU machine sees the repository at another path).
#pragma once
#include <cstdlib>
#include <filesystem>

namespace longtune::test {

inline std::filesystem::path fixture_dir() {
  if (const char* env = std::getenv("LONGTUNE_FIXTURE_DIR"); env && *env) return env;
  return LONGTUNE_FIXTURE_DIR;
}

}  // namespace longtune::test
