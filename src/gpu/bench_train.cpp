// longtune bench train: training-step throughput of the single-GPU engine on a Llama shape with
// random weights and random tokens, the same experiment as the PyTorch anchor
// (bench/anchor_torch.py `train MODEL SEQ gpu`): one sequence of --seq-len tokens per step, AdamW,
// median step time over the timed steps. Prints the anchor's RESULT line (same keys) and the
// brief's [RESULT] lines.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "src/model/hf_adapter.hpp"
#include "kernels/cuda/cuda_check.cuh"
#include "src/cli/bench.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/memory/host_memory.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

namespace {

// Llama 3.2 1B / 3B and 3.1 8B shapes (bench/anchor_torch.py CONFIGS).
LlamaConfig llama_shape(const std::string& name) {
  LlamaConfig c;
  c.vocab_size = 128256;
  c.max_position_embeddings = 131072;
  c.rope_theta = 500000.0;
  c.rope.type = RopeScaling::Type::Llama3;
  c.rope.factor = 8.0;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 8192;
  c.rms_norm_eps = 1e-5;
  if (name == "1b") {
    c.hidden_size = 2048, c.num_hidden_layers = 16, c.num_attention_heads = 32, c.num_key_value_heads = 8;
    c.intermediate_size = 8192, c.tie_word_embeddings = true;
  } else if (name == "3b") {
    c.hidden_size = 3072, c.num_hidden_layers = 28, c.num_attention_heads = 24, c.num_key_value_heads = 8;
    c.intermediate_size = 8192, c.tie_word_embeddings = true;
  } else if (name == "8b") {
    c.hidden_size = 4096, c.num_hidden_layers = 32, c.num_attention_heads = 32, c.num_key_value_heads = 8;
    c.intermediate_size = 14336, c.tie_word_embeddings = false;
  } else {
    return load_hf_model_config(name);  // a model directory: its config.json
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  return c;
}

}  // namespace

int run_bench_train(int argc, char** argv) {
  std::string model = "1b", dtype = "bf16", recompute = "auto", attention = "auto";
  int64_t seq = 16384, steps = 5, warmup = 2;
  bool nondet = false;
  po::options_description desc("longtune bench train: single-GPU training step on a Llama shape (random weights)");
  desc.add_options()("help,h", "this text")
      ("model", po::value(&model)->default_value(model), "1b | 3b | 8b (Llama 3.x shapes) or a model directory")
      ("seq-len", po::value(&seq)->default_value(seq), "tokens per step (one sequence)")
      ("steps", po::value(&steps)->default_value(steps), "steps in all (the median of those after --warmup is reported)")
      ("warmup", po::value(&warmup)->default_value(warmup), "untimed first steps")
      ("dtype", po::value(&dtype)->default_value(dtype), "bf16 | fp16")
      ("recompute", po::value(&recompute)->default_value(recompute),
       "none (keep activations) | layer (keep layer inputs, recompute) | auto (none when it fits)")
      ("attention", po::value(&attention)->default_value(attention), "attention kernel: auto | tensor-core | sm75 (fp16)")
      ("nondeterministic-attention", po::bool_switch(&nondet), "fp32 atomics in attention backward (faster)");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;
  if (seq < 2) throw ConfigError("--seq-len: expected at least 2, got " + std::to_string(seq));
  if (steps <= warmup) throw ConfigError("--steps: expected more than --warmup");
  if (cuda::device_count() == 0) throw ConfigError("bench train: expected a CUDA GPU, found none");

  const LlamaConfig cfg = llama_shape(model);
  const ParamTable table(cfg);
  gpu::GpuEngineOptions opt;
  if (dtype == "bf16") opt.model.compute_dtype = DType::BF16;
  else if (dtype == "fp16") opt.model.compute_dtype = DType::F16;
  else throw ConfigError("--dtype: expected bf16 or fp16, got " + dtype);
  opt.model.max_tokens = seq;
  opt.model.nondeterministic_attention = nondet;
  opt.model.attention_kernel = gpu::attention_kernel_from_name(attention);
  opt.model.recompute = gpu::GpuEngine::choose_recompute(recompute, cfg, opt);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("[bench] %s | %s shape: %.3f B parameters | seq %lld | %s | recompute %s | attention %s%s\n", prop.name,
              model.c_str(), double(table.num_parameters()) / 1e9, (long long)seq, dtype.c_str(),
              opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer", attention.c_str(),
              nondet ? " (nondeterministic dq)" : "");
  std::printf("[bench] device memory plan: %s\n", gpu::GpuEngine::plan(cfg, opt).describe().c_str());

  gpu::GpuEngine engine(cfg, table, AdamWConfig{1e-5, 0.9, 0.999, 1e-8, 0.01, 1.0}, opt);
  engine.init_random(1234);

  // One document of seq tokens, random ids; targets are the next tokens (the anchor's labels=ids).
  PackedBatch b;
  b.rows = 1;
  b.seq_len = seq;
  b.tokens.resize(size_t(seq));
  uint64_t x = 88172645463325252ull;
  for (auto& t : b.tokens) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    t = int32_t(x % uint64_t(cfg.vocab_size));
  }
  b.targets.assign(size_t(seq), -1);
  for (int64_t t = 0; t + 1 < seq; ++t) b.targets[size_t(t)] = b.tokens[size_t(t + 1)];
  b.positions.resize(size_t(seq));
  for (int64_t t = 0; t < seq; ++t) b.positions[size_t(t)] = int32_t(t);
  b.cu_seqlens = {0, int32_t(seq)};
  const int64_t targets = b.num_targets();

  std::vector<double> times;
  LossSum loss;
  for (int64_t s = 1; s <= steps; ++s) {
    engine.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    loss = engine.accumulate(b, targets);
    engine.optimizer_step(s, 1e-5);
    engine.synchronize();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::printf("[bench] step %lld: %.3f s, loss %.4f\n", (long long)s, times.back(), loss.mean());
  }
  std::vector<double> timed(times.begin() + warmup, times.end());
  std::sort(timed.begin(), timed.end());
  const double step_s = timed[timed.size() / 2];
  const double tps = double(seq) / step_s;
  const double fpt = model_flops_per_token(cfg, seq);
  const double peak_gib = double(engine.peak_device_bytes()) / double(1ull << 30);
  std::printf("RESULT {\"engine\":\"longtune\",\"model\":\"%s\",\"seq\":%lld,\"mode\":\"gpu\",\"dtype\":\"%s\","
              "\"recompute\":\"%s\",\"step_s\":%.4f,\"tokens_per_s\":%.1f,\"mfu_vs_790\":%.3f,\"mfu_vs_989\":%.3f,"
              "\"peak_gib\":%.2f,\"loss\":%.4f}\n",
              model.c_str(), (long long)seq, dtype.c_str(),
              opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer", step_s, tps, tps * fpt / 790e12,
              tps * fpt / 989e12, peak_gib, loss.mean());
  // The brief's benchmark-mode lines.
  std::printf("[RESULT] peak VRAM per GPU: %.2f GiB\n", peak_gib);
  std::printf("[RESULT] average iteration latency: %.4f s (median of %zu)\n", step_s, timed.size());
  std::printf("[RESULT] tokens per iteration: %lld\n", (long long)seq);
  std::printf("[RESULT] throughput: %.1f tokens/s\n", tps);
  std::printf("[RESULT] %s\n", format_numa_usage(host_memory_per_node()).c_str());  // "host memory per NUMA node: ..."
  return 0;
}

}  // namespace longtune::cli
