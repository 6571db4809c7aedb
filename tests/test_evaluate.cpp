// End-to-end evaluation: HDF5 dataset -> packer -> CPU model, against transformers run one
// forward per document/chunk (tests/golden/make_eval_dataset.py).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.hpp"
#include "io/token_dataset.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/train/evaluate.hpp"
#include "tests/test_paths.hpp"

using namespace longtune;

TEST(Evaluate, DatasetLossMatchesTransformers) {
  const auto fixtures = longtune::test::fixture_dir();
  std::ifstream in(fixtures / "tiny_dataset_eval.json");
  ASSERT_TRUE(in) << "missing tiny_dataset_eval.json";
  const auto ref = nlohmann::json::parse(in);
  const std::string model_dir = (fixtures / ref.at("model").get<std::string>()).string();

  const LlamaConfig cfg = load_hf_model_config(model_dir);
  const ParamTable table(cfg);
  std::vector<float> params(size_t(table.total_elements()), 0.0f);
  load_hf_weights(SafetensorsDir(model_dir), table, params.data());
  const TokenDataset data = load_token_dataset((fixtures / "tiny_dataset.h5").string(), cfg.vocab_size);
  LlamaCpu model(cfg, table);

  // The result must not depend on how many rows go into one forward.
  for (int64_t micro_batch : {1, 2, 5}) {
    SCOPED_TRACE("micro_batch " + std::to_string(micro_batch));
    const EvalResult r = evaluate_dataset(model, params.data(), data, ref.at("seq_len").get<int64_t>(), micro_batch);
    EXPECT_EQ(r.loss.count, ref.at("count").get<int64_t>());
    EXPECT_NEAR(r.loss.mean(), ref.at("loss").get<double>(), 1e-5 * ref.at("loss").get<double>());
  }
}
