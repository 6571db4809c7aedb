// The whole model and a training run on the GPU against HF transformers (the golden fixtures in
// float64) and against the CPU engine, at bf16/fp16 tolerances; recomputation and determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "io/safetensors.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/model/llama_cpu.hpp"
#include "tests/cuda/gpu_test_util.hpp"
#include "tests/golden_fixture.hpp"

using namespace longtune;
using longtune::test::golden_dir;
using longtune::test::load_batch;
using longtune::test::read_f64;

namespace {

// The golden case whose head_dim (64) the CUDA attention supports.
const char* kCase = "gqa_hd64_gpu";

// The model of the golden case and its packed batch.
struct Golden : longtune::test::GoldenModel {
  PackedBatch batch;
};

Golden load_golden() {
  Golden g;
  static_cast<longtune::test::GoldenModel&>(g) = longtune::test::load_golden_model(kCase);
  g.batch = load_batch(golden_dir() / kCase / "batch.json");
  return g;
}

double rel(const float* a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

double rel(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

gpu::GpuEngineOptions options(DType dtype, gpu::Recompute recompute, int64_t max_tokens) {
  gpu::GpuEngineOptions o;
  o.model.compute_dtype = dtype;
  o.model.recompute = recompute;
  o.model.max_tokens = max_tokens;
  o.model.loss_chunk = 64;  // several chunks of the fused lm_head + cross-entropy
  o.initial_loss_scale = 1024.0;
  return o;
}

struct GpuResult {
  LossSum loss;
  std::vector<float> grads;
};

GpuResult gpu_forward_backward(const Golden& g, DType dtype, gpu::Recompute recompute,
                               cuda::AttentionKernel kernel = cuda::AttentionKernel::kAuto) {
  gpu::GpuEngineOptions o = options(dtype, recompute, g.batch.num_tokens());
  o.model.attention_kernel = kernel;
  gpu::GpuEngine engine(g.cfg, *g.table, AdamWConfig{}, o);
  engine.upload_state(g.weights.data(), nullptr, nullptr);
  GpuResult r;
  r.loss = engine.accumulate(g.batch, g.batch.num_targets());
  r.grads.assign(g.weights.size(), 0.0f);
  engine.download_grads(r.grads.data());
  // fp16: the gradients carry the loss scale.
  const float unscale = float(1.0 / engine.loss_scale());
  for (float& x : r.grads) x *= unscale;
  return r;
}

}  // namespace

TEST(GpuModel, MatchesTransformersAndCpuEngine) {
  SKIP_WITHOUT_GPU();
  const Golden g = load_golden();
  const SafetensorsFile ref((golden_dir() / kCase / "reference.safetensors").string());
  const double ref_loss = read_f64(ref, "loss").at(0);

  LlamaCpu cpu(g.cfg, *g.table);
  std::vector<float> cpu_grads(g.weights.size(), 0.0f);
  const LossSum cpu_loss =
      cpu.forward_backward(g.weights.data(), cpu_grads.data(), g.batch, 1.0 / double(g.batch.num_targets()));

  struct Variant {
    DType dtype;
    cuda::AttentionKernel kernel;
    const char* name;
  };
  for (const Variant& v : {Variant{DType::BF16, cuda::AttentionKernel::kAuto, "bf16"},
                           Variant{DType::F16, cuda::AttentionKernel::kAuto, "fp16"},
                           Variant{DType::F16, cuda::AttentionKernel::kTensorCoreSm75, "fp16, sm75 attention"}}) {
    const DType dtype = v.dtype;
    SCOPED_TRACE(v.name);
    const GpuResult r = gpu_forward_backward(g, dtype, gpu::Recompute::kNone, v.kernel);
    ASSERT_EQ(r.loss.count, g.batch.num_targets());
    const double loss_rel = std::abs(r.loss.mean() - ref_loss) / ref_loss;
    std::printf("[gpu-model] %s: loss %.6f (transformers %.6f, rel %.2e; CPU %.6f)\n", v.name, r.loss.mean(),
                ref_loss, loss_rel, cpu_loss.mean());
    EXPECT_LT(loss_rel, dtype == DType::BF16 ? 1e-2 : 3e-3);
    double worst = 0;
    std::string worst_name;
    for (const ParamEntry& e : g.table->entries()) {
      const double err = rel(r.grads.data() + e.offset, read_f64(ref, "grad/" + e.name));
      const double err_cpu = rel(r.grads.data() + e.offset, cpu_grads.data() + e.offset, e.numel);
      if (err > worst) worst = err, worst_name = e.name;
      EXPECT_LT(err, dtype == DType::BF16 ? 5e-2 : 1e-2) << e.name;
      EXPECT_LT(err_cpu, dtype == DType::BF16 ? 5e-2 : 1e-2) << e.name << " vs the CPU engine";
      for (int64_t i = 0; i < e.numel; ++i) ASSERT_TRUE(std::isfinite(r.grads[size_t(e.offset + i)])) << e.name;
    }
    std::printf("[gpu-model] %s: worst gradient rel vs transformers %.2e (%s)\n", v.name, worst, worst_name.c_str());
  }
}

TEST(GpuModel, RecomputeAndRepeatAreBitIdentical) {
  SKIP_WITHOUT_GPU();
  const Golden g = load_golden();
  const GpuResult keep = gpu_forward_backward(g, DType::BF16, gpu::Recompute::kNone);
  const GpuResult again = gpu_forward_backward(g, DType::BF16, gpu::Recompute::kNone);
  const GpuResult recompute = gpu_forward_backward(g, DType::BF16, gpu::Recompute::kLayer);
  EXPECT_EQ(keep.loss.sum, again.loss.sum);
  EXPECT_EQ(keep.loss.sum, recompute.loss.sum);
  EXPECT_EQ(0, std::memcmp(keep.grads.data(), again.grads.data(), keep.grads.size() * 4)) << "run to run";
  EXPECT_EQ(0, std::memcmp(keep.grads.data(), recompute.grads.data(), keep.grads.size() * 4))
      << "per-layer recomputation must reproduce the kept activations exactly";
}

// Four AdamW steps (clipping on the first two, weight decay) against torch.optim.AdamW in float64
// (tests/golden/generate_training.py): the GPU run follows the reference loss curve.
TEST(GpuTraining, FollowsTheReferenceRun) {
  SKIP_WITHOUT_GPU();
  const Golden g = load_golden();
  const auto dir = golden_dir() / kCase;
  std::ifstream in(dir / "training.json");
  const auto j = nlohmann::json::parse(in);
  AdamWConfig a;
  a.lr = j.at("lr");
  a.beta1 = j.at("betas")[0];
  a.beta2 = j.at("betas")[1];
  a.eps = j.at("eps");
  a.weight_decay = j.at("weight_decay");
  a.clip = j.at("clip");
  const auto losses = j.at("losses").get<std::vector<double>>();
  const SafetensorsFile ref((dir / "training.safetensors").string());

  for (DType dtype : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    gpu::GpuEngine engine(g.cfg, *g.table, a, options(dtype, gpu::Recompute::kLayer, g.batch.num_tokens()));
    engine.upload_state(g.weights.data(), nullptr, nullptr);
    for (size_t s = 0; s < losses.size(); ++s) {
      const LossSum l = engine.accumulate(g.batch, g.batch.num_targets());
      const gpu::GpuStepInfo info = engine.optimizer_step(int64_t(s + 1), a.lr);
      ASSERT_FALSE(info.skipped);
      const double err = std::abs(l.mean() - losses[s]) / losses[s];
      std::printf("[gpu-train] %s step %zu: loss %.5f (reference %.5f, rel %.2e), grad norm %.4f\n",
                  std::string(dtype_name(dtype)).c_str(), s + 1, l.mean(), losses[s], err, info.optim.grad_norm);
      EXPECT_LT(err, 2e-2) << "step " << s + 1;
    }
    std::vector<float> master(g.weights.size());
    engine.download_state(master.data(), nullptr, nullptr);
    double worst = 0;
    for (const ParamEntry& e : g.table->entries()) {
      // Compare the update (final - initial), not the weights, so the tolerance means something.
      const std::vector<double> final_ref = read_f64(ref, "param/" + e.name);
      std::vector<double> ref_update(final_ref.size());
      std::vector<float> update(final_ref.size());
      for (size_t i = 0; i < final_ref.size(); ++i) {
        ref_update[i] = final_ref[i] - g.weights[size_t(e.offset) + i];
        update[i] = master[size_t(e.offset) + i] - g.weights[size_t(e.offset) + i];
      }
      const double err = rel(update.data(), ref_update);
      worst = std::max(worst, err);
      EXPECT_LT(err, 0.15) << e.name;
    }
    std::printf("[gpu-train] %s: worst update rel after %zu steps %.3f\n", std::string(dtype_name(dtype)).c_str(),
                losses.size(), worst);
  }
}

TEST(GpuModel, RefusesARunThatCannotFit) {
  SKIP_WITHOUT_GPU();
  const Golden g = load_golden();
  gpu::GpuEngineOptions o = options(DType::BF16, gpu::Recompute::kNone, int64_t(1) << 30);
  try {
    gpu::GpuEngine engine(g.cfg, *g.table, AdamWConfig{}, o);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("GPU memory"), std::string::npos) << e.what();
  }
}
