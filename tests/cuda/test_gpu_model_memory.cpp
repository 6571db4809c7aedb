// The GPU model's memory plan with offloaded layer inputs and a token-tiled MLP (issue 6, point 3):
// activation_bytes / host_activation_bytes for the Llama 3.1 8B shape at 64K and 128K tokens.
// The plan is a counting pass that never touches the GPU, so these tests run (and must pass)
// without one.
#include <gtest/gtest.h>

#include <cstdio>

#include "src/common/error.hpp"
#include "src/gpu/llama_gpu.hpp"

using namespace longtune;
using gpu::GpuModelOptions;
using gpu::LlamaGpu;
using gpu::Recompute;

namespace {

// Llama 3.1 8B (bench_train's "8b").
LlamaConfig llama_8b() {
  LlamaConfig c;
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.max_position_embeddings = 131072;
  c.rope_theta = 500000.0;
  c.rope.type = RopeScaling::Type::Llama3;
  c.rope.factor = 8.0;
  c.rope.original_max_position_embeddings = 8192;
  return c;
}

GpuModelOptions opts(DType dtype, Recompute r, int64_t T, bool offload, int64_t mlp_chunk) {
  GpuModelOptions o;
  o.compute_dtype = dtype;
  o.recompute = r;
  o.max_tokens = T;
  o.offload_activations = offload;
  o.mlp_chunk = mlp_chunk;
  return o;
}

double gib(size_t b) { return double(b) / double(size_t(1) << 30); }

}  // namespace

TEST(GpuModelMemory, OffloadAndMlpTilingShrinkThe8bPlan) {
  const LlamaConfig cfg = llama_8b();
  const int64_t C = cfg.hidden_size, F = cfg.intermediate_size, L = cfg.num_hidden_layers;
  const int64_t chunk = 8192;
  for (DType dtype : {DType::BF16, DType::F16}) {
    for (int64_t T : {int64_t(65536), int64_t(131072)}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " T=" + std::to_string(T));
      const size_t none = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kNone, T, false, 0));
      const size_t layer = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, T, false, 0));
      const size_t off = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, T, true, 0));
      const size_t tiled = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, T, false, chunk));
      const size_t both = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, T, true, chunk));
      const size_t host_off = LlamaGpu::host_activation_bytes(cfg, opts(dtype, Recompute::kLayer, T, true, chunk));
      std::printf("[gpu-memory] 8B %s T=%lld: recompute none %.2f GiB, layer %.2f GiB, +offload %.2f GiB "
                  "(host %.2f GiB pinned), +mlp_chunk %lld %.2f GiB, both %.2f GiB\n",
                  std::string(dtype_name(dtype)).c_str(), static_cast<long long>(T), gib(none), gib(layer), gib(off),
                  gib(host_off), static_cast<long long>(chunk), gib(tiled), gib(both));
      // Offload: the device keeps 2 of the L+1 layer inputs; resid[0 .. L-2] live on the host.
      const size_t slice = gpu::align_up(size_t(T * C) * 2);
      EXPECT_EQ(layer - off, size_t(L - 1) * slice);
      EXPECT_EQ(host_off, size_t((L - 1) * T * C) * 2);
      EXPECT_EQ(LlamaGpu::host_activation_bytes(cfg, opts(dtype, Recompute::kLayer, T, false, chunk)), 0u);
      // Tiling: gate|up, SwiGLU and their gradients (12 F bytes per token) for chunk tokens, not T.
      auto mlp = [&](int64_t rows) {
        return 2 * gpu::align_up(size_t(rows * 2 * F) * 2) + 2 * gpu::align_up(size_t(rows * F) * 2);
      };
      EXPECT_EQ(layer - tiled, mlp(T) - mlp(chunk));
      EXPECT_NEAR(double(layer - tiled), 12.0 * double(F) * double(T - chunk), 4096.0);
      EXPECT_EQ(layer - both, (layer - off) + (layer - tiled));
      EXPECT_LT(both, layer / 3);
    }
    // Peak memory grows slowly with the sequence: with both options, doubling T from 64K to 128K
    // adds what the per-token buffers that remain cost (a few (T, C) streams, q|k|v, attention).
    const size_t both64 = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, 65536, true, chunk));
    const size_t both128 = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, 131072, true, chunk));
    const size_t layer64 = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, 65536, false, 0));
    const size_t layer128 = LlamaGpu::activation_bytes(cfg, opts(dtype, Recompute::kLayer, 131072, false, 0));
    std::printf("[gpu-memory] 8B %s 64K -> 128K: layer +%.2f GiB, offload + mlp_chunk +%.2f GiB\n",
                std::string(dtype_name(dtype)).c_str(), gib(layer128 - layer64), gib(both128 - both64));
    EXPECT_LT(double(both128 - both64), 0.3 * double(layer128 - layer64));
  }
}

TEST(GpuModelMemory, OptionsAreValidated) {
  const LlamaConfig cfg = llama_8b();
  // Offload needs the per-layer recomputation.
  EXPECT_THROW(LlamaGpu::activation_bytes(cfg, opts(DType::BF16, Recompute::kNone, 4096, true, 0)), ConfigError);
  EXPECT_THROW(LlamaGpu::host_activation_bytes(cfg, opts(DType::BF16, Recompute::kNone, 4096, true, 0)),
               ConfigError);
  EXPECT_THROW(LlamaGpu::activation_bytes(cfg, opts(DType::BF16, Recompute::kLayer, 4096, false, -1)), ConfigError);
  // kNone keeps every layer's gate|up: mlp_chunk does not apply (and changes nothing).
  EXPECT_EQ(LlamaGpu::activation_bytes(cfg, opts(DType::BF16, Recompute::kNone, 4096, false, 1024)),
            LlamaGpu::activation_bytes(cfg, opts(DType::BF16, Recompute::kNone, 4096, false, 0)));
  // A chunk at least the micro-batch is one tile: the untiled plan.
  EXPECT_EQ(LlamaGpu::activation_bytes(cfg, opts(DType::BF16, Recompute::kLayer, 4096, false, 1 << 20)),
            LlamaGpu::activation_bytes(cfg, opts(DType::BF16, Recompute::kLayer, 4096, false, 0)));
  // One layer: both inputs stay in the device ring, nothing goes to the host.
  LlamaConfig one = cfg;
  one.num_hidden_layers = 1;
  EXPECT_EQ(LlamaGpu::host_activation_bytes(one, opts(DType::BF16, Recompute::kLayer, 4096, true, 0)), 0u);
  EXPECT_EQ(LlamaGpu::activation_bytes(one, opts(DType::BF16, Recompute::kLayer, 4096, true, 0)),
            LlamaGpu::activation_bytes(one, opts(DType::BF16, Recompute::kLayer, 4096, false, 0)));
}
