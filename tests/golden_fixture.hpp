// Reading the golden fixtures of tests/golden/generate.py (format: tests/golden/README.md):
// the fixture folder, a case's packed batch (batch.json) and its float64 reference tensors.
#pragma once
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "src/data/packed_batch.hpp"
#include "tests/test_paths.hpp"

namespace longtune::test {

inline std::filesystem::path golden_dir() { return fixture_dir() / "golden"; }

inline PackedBatch load_batch(const std::filesystem::path& path) {
  std::ifstream in(path);
  const auto j = nlohmann::json::parse(in);
  PackedBatch b;
  b.rows = j.at("rows").get<int64_t>();
  b.seq_len = j.at("seq_len").get<int64_t>();
  b.tokens = j.at("tokens").get<std::vector<int32_t>>();
  b.targets = j.at("targets").get<std::vector<int32_t>>();
  b.positions = j.at("positions").get<std::vector<int32_t>>();
  b.cu_seqlens = j.at("cu_seqlens").get<std::vector<int32_t>>();
  return b;
}

// A float64 reference tensor of a fixture.
inline std::vector<double> read_f64(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  if (!t) throw std::runtime_error(f.path() + " lacks " + name);
  EXPECT_EQ(t->dtype, DType::F64) << name;
  std::vector<double> v(size_t(t->numel()));
  f.read_raw(*t, v.data());
  return v;
}

}  // namespace longtune::test
