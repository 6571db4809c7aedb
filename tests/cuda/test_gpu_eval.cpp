// `longtune eval --device cuda`: held-out evaluation through the trainer's DeviceEngine (the GPU
// engine behind make_device_engine), against the CPU evaluation of the same model and data.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "io/token_dataset.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/model/llama_cpu.hpp"
#include "src/train/device_engine.hpp"
#include "src/train/evaluate.hpp"
#include "tests/cuda/gpu_test_util.hpp"
#include "tests/golden_fixture.hpp"

using namespace longtune;
using longtune::test::fixture_dir;
using longtune::test::golden_dir;
using longtune::test::load_batch;

namespace {

// The golden case whose head_dim (64) the CUDA attention supports; vocab 128, as the tiny dataset.
const char* kCase = "gqa_hd64_gpu";

using Model = longtune::test::GoldenModel;
Model load_model() { return longtune::test::load_golden_model(kCase); }

// What `longtune eval --device cuda --dtype D --attention A` builds.
std::unique_ptr<DeviceEngine> eval_engine(const Model& m, const std::string& dtype, const std::string& attention,
                                          int64_t max_tokens) {
  DeviceEngineOptions opt;
  opt.device = "cuda";
  opt.dtype = dtype;
  opt.attention = attention;
  opt.max_tokens = max_tokens;
  std::unique_ptr<DeviceEngine> engine = make_device_engine(opt, m.cfg, *m.table);
  engine->upload_state(m.weights.data(), nullptr, nullptr);
  return engine;
}

struct Variant {
  const char* dtype;
  const char* attention;
};
const Variant kVariants[] = {{"bf16", "auto"}, {"fp16", "auto"}, {"fp16", "sm75"}};

}  // namespace

// The tiny dataset (8 documents, 135 counted targets at seq_len 32) packed as `eval` packs it.
TEST(GpuEval, DatasetLossMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const Model m = load_model();
  const TokenDataset data = load_token_dataset((fixture_dir() / "tiny_dataset.h5").string(), m.cfg.vocab_size);
  const int64_t seq_len = 32;
  LlamaCpu cpu(m.cfg, *m.table);
  for (int64_t micro_batch : {1, 2}) {
    const EvalResult ref = evaluate_dataset(cpu, m.weights.data(), data, seq_len, micro_batch);
    ASSERT_GT(ref.loss.count, 0);
    for (const Variant& v : kVariants) {
      SCOPED_TRACE(std::string(v.dtype) + ", attention " + v.attention + ", micro-batch " +
                   std::to_string(micro_batch));
      auto engine = eval_engine(m, v.dtype, v.attention, seq_len * micro_batch);
      const EvalResult r = evaluate_dataset([&](const PackedBatch& b) { return engine->evaluate(b); }, data, seq_len,
                                            micro_batch);
      EXPECT_EQ(r.micro_batches, ref.micro_batches);
      EXPECT_EQ(r.tokens, ref.tokens);
      ASSERT_EQ(r.loss.count, ref.loss.count);
      ASSERT_TRUE(std::isfinite(r.loss.mean()));
      const double rel = std::abs(r.loss.mean() - ref.loss.mean()) / ref.loss.mean();
      std::printf("[gpu-eval] %s/%s micro-batch %lld: loss %.6f (CPU %.6f, rel %.2e), perplexity %.4f (CPU %.4f)\n",
                  v.dtype, v.attention, (long long)micro_batch, r.loss.mean(), ref.loss.mean(), rel,
                  std::exp(r.loss.mean()), std::exp(ref.loss.mean()));
      EXPECT_LT(rel, 1e-2);
    }
  }
}

// The golden packed batch (documents of several lengths in one row set), one forward.
TEST(GpuEval, GoldenBatchLossMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const Model m = load_model();
  const PackedBatch batch = load_batch(golden_dir() / kCase / "batch.json");
  LlamaCpu cpu(m.cfg, *m.table);
  const LossSum ref = cpu.forward(m.weights.data(), batch);
  ASSERT_GT(ref.count, 0);
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(std::string(v.dtype) + ", attention " + v.attention);
    auto engine = eval_engine(m, v.dtype, v.attention, batch.num_tokens());
    const LossSum r = engine->evaluate(batch);
    ASSERT_EQ(r.count, ref.count);
    EXPECT_LT(std::abs(r.mean() - ref.mean()) / ref.mean(), 1e-2)
        << "GPU " << r.mean() << " vs CPU " << ref.mean();
  }
}
