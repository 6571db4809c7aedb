// The memory plans and the planner with the activation options (issue 6, point 3): offloaded layer
// inputs move from the engines' device plans to their pinned host memory, --recompute auto drops the
// offload when it keeps everything, and `longtune plan` finds longer sequences with them. Plans are
// counting passes that never touch the GPU, so these tests run (and must pass) without one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>

#include "src/common/error.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/model_shapes.hpp"
#include "src/gpu/plan.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/memory/host_memory.hpp"

using namespace longtune;
using gpu::LlamaGpu;
using gpu::Recompute;

namespace {

constexpr double kGiB = double(1ull << 30);

gpu::GpuModelOptions layer_options(int64_t tokens, bool offload, int64_t mlp_chunk) {
  gpu::GpuModelOptions m;
  m.compute_dtype = DType::BF16;
  m.recompute = Recompute::kLayer;
  m.max_tokens = tokens;
  m.offload_activations = offload;
  m.mlp_chunk = mlp_chunk;
  return m;
}

}  // namespace

TEST(GpuPlan, OffloadedLayerInputsMoveFromTheDevicePlanToPinnedHostMemory) {
  const LlamaConfig cfg = gpu::llama_shape_by_name("8b");
  const int64_t T = 65536;
  const gpu::GpuModelOptions base = layer_options(T, false, 0), off = layer_options(T, true, 0);
  const size_t moved = LlamaGpu::activation_bytes(cfg, base) - LlamaGpu::activation_bytes(cfg, off);
  const size_t host = round_up_to_pages(LlamaGpu::host_activation_bytes(cfg, off));
  ASSERT_GT(host, size_t(10) << 30);  // 31 layer inputs of 64K x 4096 bf16: 15.5 GiB

  gpu::GpuEngineOptions g0, g1;
  g0.model = base, g1.model = off;
  const gpu::GpuMemoryPlan p0 = gpu::GpuEngine::plan(cfg, g0), p1 = gpu::GpuEngine::plan(cfg, g1);
  EXPECT_EQ(p0.host_pinned, 0u);
  EXPECT_EQ(p1.host_pinned, host);
  EXPECT_EQ(p0.activations - p1.activations, moved);
  EXPECT_EQ(p0.total() - p1.total(), moved);
  EXPECT_EQ(p0.describe().find("host"), std::string::npos) << p0.describe();
  EXPECT_NE(p1.describe().find("host: pinned activations 15.50 GiB"), std::string::npos) << p1.describe();

  for (gpu::OptimizerPlace optimizer : {gpu::OptimizerPlace::kHost, gpu::OptimizerPlace::kDevice}) {
    for (gpu::WeightPlace weights : {gpu::WeightPlace::kResident, gpu::WeightPlace::kStreamed}) {
      for (int world : {1, 8}) {
        gpu::ZeroEngineOptions z0, z1;
        z0.model = base, z1.model = off;
        z0.optimizer = z1.optimizer = optimizer;
        z0.weights = z1.weights = weights;
        const gpu::ZeroMemoryPlan q0 = gpu::ZeroEngine::plan(cfg, z0, world), q1 = gpu::ZeroEngine::plan(cfg, z1, world);
        EXPECT_EQ(q0.activations - q1.activations, moved);
        EXPECT_EQ(q0.device_total() - q1.device_total(), moved);
        EXPECT_EQ(q1.host_pinned - q0.host_pinned, host);
        EXPECT_EQ(q1.host_total() - q0.host_total(), host);
        EXPECT_EQ(q1.host_state, q0.host_state);
      }
    }
  }

  // The MLP tiles only shrink the device side.
  gpu::GpuEngineOptions g2;
  g2.model = layer_options(T, true, gpu::kPlanMlpChunk);
  const gpu::GpuMemoryPlan p2 = gpu::GpuEngine::plan(cfg, g2);
  EXPECT_EQ(p2.host_pinned, p1.host_pinned);
  EXPECT_LT(p2.activations, p1.activations);
  std::printf("[plan] 8B at 64K, recompute per layer: activations %.2f GiB; layer inputs to host %.2f GiB "
              "(+%.2f GiB pinned); and MLP tiles of %lld %.2f GiB\n",
              double(p0.activations) / kGiB, double(p1.activations) / kGiB, double(p1.host_pinned) / kGiB,
              (long long)gpu::kPlanMlpChunk, double(p2.activations) / kGiB);
}

// auto tries recompute none first, which keeps every activation (no layer inputs to offload); when
// that does not fit it falls back to layer with what the user asked for.
TEST(GpuPlan, RecomputeAutoDropsActivationOffloadOnlyWhenItKeepsEverything) {
  const LlamaConfig cfg = gpu::llama_shape_by_name("1b");
  const size_t plenty = size_t(1) << 40, little = size_t(1) << 30;
  const auto single = [&](const std::string& recompute, size_t free) {
    gpu::GpuEngineOptions o;
    o.model = layer_options(8192, true, 2048);
    gpu::GpuEngine::apply_recompute(recompute, cfg, &o, free);
    return o.model;
  };
  const auto sharded = [&](const std::string& recompute, size_t free) {
    gpu::ZeroEngineOptions o;
    o.model = layer_options(8192, true, 2048);
    gpu::ZeroEngine::apply_placement(&o, "optimizer", "resident", recompute, cfg, 1, free);
    return o.model;
  };
  for (const auto& apply : {std::function<gpu::GpuModelOptions(const std::string&, size_t)>(single),
                            std::function<gpu::GpuModelOptions(const std::string&, size_t)>(sharded)}) {
    gpu::GpuModelOptions m = apply("auto", plenty);
    EXPECT_EQ(m.recompute, Recompute::kNone);
    EXPECT_FALSE(m.offload_activations);
    EXPECT_NO_THROW(LlamaGpu::activation_bytes(cfg, m));  // a valid model plan
    m = apply("auto", little);
    EXPECT_EQ(m.recompute, Recompute::kLayer);
    EXPECT_TRUE(m.offload_activations);
    EXPECT_EQ(m.mlp_chunk, 2048);
    m = apply("layer", plenty);
    EXPECT_EQ(m.recompute, Recompute::kLayer);
    EXPECT_TRUE(m.offload_activations);
    try {
      apply("none", plenty);
      ADD_FAILURE() << "recompute none with activation offload must be refused";
    } catch (const ConfigError& e) {
      EXPECT_STREQ(e.what(), "--offload-activations: expected --recompute layer or auto, got --recompute none");
    }
  }
}

// The planner's placements that put activations on the host reach longer sequences, and the search
// counts their pinned host memory.
TEST(GpuPlan, ActivationsToHostTrainLongerSequences) {
  const LlamaConfig cfg = gpu::llama_shape_by_name("8b");
  const std::vector<gpu::Placement> placements = gpu::plan_placements();
  for (double gpu_gib : {48.0, 16.0}) {
    const gpu::PlanBudget budget = gpu::plan_budget(gpu_gib * kGiB, 256 * kGiB, 1, 1, 1, DType::BF16);
    int64_t before = 0, after = 0;
    for (size_t i = 0; i < placements.size(); ++i) {
      const gpu::Placement& p = placements[i];
      const int64_t longest = gpu::longest_sequence(cfg, p, budget, int64_t(1) << 20);
      std::printf("[plan] 8B, GPU %.0f GiB, host 256 GiB: %-60s longest %lld\n", gpu_gib, p.name.c_str(),
                  (long long)longest);
      int64_t& best = p.offload_activations ? after : before;
      best = std::max(best, longest);
      if (p.offload_activations) {
        // Each follows the same placement without the options, and goes further.
        ASSERT_GT(i, 0u);
        const gpu::Placement& plain = placements[i - 1];
        EXPECT_EQ(plain.offload, p.offload);
        EXPECT_EQ(plain.weights, p.weights);
        EXPECT_EQ(plain.recompute, Recompute::kLayer);
        EXPECT_FALSE(plain.offload_activations);
        EXPECT_EQ(p.mlp_chunk, gpu::kPlanMlpChunk);
        const int64_t plain_longest = gpu::longest_sequence(cfg, plain, budget, int64_t(1) << 20);
        if (plain_longest > 0) {
          EXPECT_GT(longest, plain_longest) << p.name;
        }
        EXPECT_NE(p.train_options().find("--recompute layer --offload-activations true --mlp-chunk 4096"),
                  std::string::npos)
            << p.train_options();
      }
    }
    EXPECT_GT(after, before) << "GPU " << gpu_gib << " GiB";
  }

  // Where the host runs out first, the search stops there: a host budget with room for exactly 64K
  // tokens of layer inputs beside everything else.
  const gpu::Placement& p = *std::find_if(placements.begin(), placements.end(), [](const gpu::Placement& q) {
    return q.offload == "optimizer" && q.offload_activations;
  });
  gpu::Placement plain = p;
  plain.offload_activations = false;
  const gpu::PlanPrediction at64k = gpu::predict_memory(cfg, p, 65536, 1, DType::BF16);
  const gpu::PlanPrediction without = gpu::predict_memory(cfg, plain, 65536, 1, DType::BF16);
  const size_t inputs = LlamaGpu::host_activation_bytes(cfg, layer_options(65536, true, gpu::kPlanMlpChunk));
  EXPECT_EQ(at64k.host - without.host, double(round_up_to_pages(inputs)));
  gpu::PlanBudget budget = gpu::plan_budget(1e6 * kGiB, 0, 1, 1, 1, DType::BF16);
  budget.host = at64k.host;
  EXPECT_EQ(gpu::longest_sequence(cfg, p, budget, int64_t(1) << 20), 65536);
  EXPECT_GT(gpu::longest_sequence(cfg, plain, budget, int64_t(1) << 20), 65536);
}
