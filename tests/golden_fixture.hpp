// Reading the golden fixtures of tests/golden/generate.py (format: tests/golden/README.md):
// the fixture folder, a case's packed batch (batch.json) and its float64 reference tensors.
#pragma once
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/model/param_table.hpp"
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

// A golden case's model: config, parameter table and flat fp32 weights.
struct GoldenModel {
  LlamaConfig cfg;
  std::unique_ptr<ParamTable> table;
  std::vector<float> weights;
};
inline GoldenModel load_golden_model(const std::string& case_name) {
  GoldenModel m;
  const std::string dir = (golden_dir() / case_name).string();
  m.cfg = load_hf_model_config(dir);
  m.table = std::make_unique<ParamTable>(m.cfg);
  m.weights.assign(size_t(m.table->total_elements()), 0.0f);
  load_hf_weights(SafetensorsDir(dir), *m.table, m.weights.data());
  return m;
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
