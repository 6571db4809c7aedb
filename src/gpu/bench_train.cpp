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
#include "src/comm/comm.hpp"
#include "src/gpu/model_shapes.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/memory/host_memory.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/train/node_memory.hpp"
#include "src/train/sharded_state.hpp"
#include "src/train/train_config.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

namespace {

// Synthetic weights on this rank's shard, the same for every world size: N(0, std) per element from
// a hash of its flat index (matrices), 1 for norm weights.
void init_random_shard(ShardedTrainState& state, const ParamTable& table, uint64_t seed, float std) {
  float* m = state.master();
  const int64_t begin = state.shard_begin(), len = state.shard_len();
  for (size_t e = 0; e < table.entries().size(); ++e) {
    const ParamEntry& pe = table.at(e);
    const int64_t lo = std::max(pe.offset, begin), hi = std::min(pe.offset + pe.numel, begin + len);
    if (lo >= hi) continue;
    const bool matrix = pe.shape.size() >= 2;
#pragma omp parallel for schedule(static)
    for (int64_t i = lo; i < hi; ++i) {
      if (!matrix) {
        m[i - begin] = 1.0f;
        continue;
      }
      auto mix = [](uint64_t z) {
        z += 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
      };
      const uint64_t a = mix(seed ^ uint64_t(i)), b = mix(a);
      const double u1 = (double(a >> 11) + 0.5) / 9007199254740992.0, u2 = double(b >> 11) / 9007199254740992.0;
      m[i - begin] = float(std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
  }
}

// One document of seq tokens, random ids (a different stream per rank); targets are the next
// tokens (the anchor's labels=ids).
PackedBatch random_batch(const LlamaConfig& cfg, int64_t seq, int rank) {
  PackedBatch b;
  b.rows = 1;
  b.seq_len = seq;
  b.tokens.resize(size_t(seq));
  uint64_t x = 88172645463325252ull + uint64_t(rank) * 0x9e3779b97f4a7c15ull;
  for (auto& t : b.tokens) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    t = int32_t(x % uint64_t(cfg.vocab_size));
  }
  b.targets.assign(size_t(seq), -1);
  for (int64_t t = 0; t + 1 < seq; ++t) b.targets[size_t(t)] = b.tokens[size_t(t + 1)];
  b.positions.resize(size_t(seq));
  for (int64_t t = 0; t < seq; ++t) b.positions[size_t(t)] = int32_t(t);
  b.cu_seqlens = {0, int32_t(seq)};
  return b;
}

// Tokens per MLP tile as the model runs it (0: one tile; recompute none never tiles).
int64_t effective_mlp_chunk(const gpu::GpuModelOptions& m) {
  return m.recompute == gpu::Recompute::kLayer ? m.mlp_chunk : 0;
}

// ", activations to host, MLP tiles of N" as the options apply (nothing with recompute none).
std::string activation_options_text(const gpu::GpuModelOptions& m) {
  if (m.recompute == gpu::Recompute::kNone) return "";
  std::string s;
  if (m.offload_activations) s += ", activations to host";
  if (effective_mlp_chunk(m) > 0) s += ", MLP tiles of " + std::to_string(m.mlp_chunk);
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The command line of `bench train`.
struct BenchTrainArgs {
  std::string model = "1b", dtype = "bf16", recompute = "auto", attention = "auto", offload = "none",
              weights = "resident", mem_limit, host_grad = "fp32", host_weights = "copy", grad_reduce = "fp32";
  int64_t seq = 16384, steps = 5, warmup = 2, mlp_chunk = 0;
  int threads = 0;
  bool nondet = false, delayed = false, offload_activations = false;
};

// Several ranks (one GPU each, NCCL) and/or offload: gpu::ZeroEngine on a ShardedTrainState, as
// `train` builds it. Weak scaling: every rank trains on its own --seq-len tokens per step.
int run_bench_train_sharded(const LlamaConfig& cfg, const ParamTable& table, Comm& comm, const BenchTrainArgs& a) {
  const std::string &model = a.model, &dtype = a.dtype, &offload = a.offload, &mem_limit = a.mem_limit,
                    &host_grad = a.host_grad, &host_weights = a.host_weights, &grad_reduce = a.grad_reduce;
  const int64_t seq = a.seq, steps = a.steps, warmup = a.warmup;
  const bool delayed = a.delayed;
  const bool root = comm.rank() == 0;
  const int count = cuda::device_count();
  if (comm.local_size() > count)
    throw ConfigError("bench train: expected one GPU per rank, got " + std::to_string(comm.local_size()) +
                      " ranks on this node and " + std::to_string(count) + " GPUs");
  CUDA_CHECK(cudaSetDevice(comm.local_rank() % count));
  if (!mem_limit.empty()) gpu::limit_device_memory(size_t(parse_byte_size(mem_limit, "--gpu-mem-limit")));
  KokkosScope kokkos(a.threads);
  gpu::ZeroEngineOptions opt;
  if (dtype == "bf16") opt.model.compute_dtype = DType::BF16;
  else if (dtype == "fp16") opt.model.compute_dtype = DType::F16;
  else throw ConfigError("--dtype: expected bf16 or fp16, got " + dtype);
  opt.model.max_tokens = seq;
  opt.model.nondeterministic_attention = a.nondet;
  opt.model.attention_kernel = gpu::attention_kernel_from_name(a.attention);
  opt.delayed_update = delayed;
  opt.model.offload_activations = a.offload_activations;
  opt.model.mlp_chunk = a.mlp_chunk;
  opt.grad_wire_dtype = gpu::ZeroEngine::grad_wire_dtype_from_name(grad_reduce);
  gpu::ZeroEngine::apply_placement(&opt, offload, a.weights, a.recompute, cfg, comm.size());
  gpu::ZeroEngine::apply_host_state(&opt, host_grad, host_weights);
  const gpu::ZeroMemoryPlan plan = gpu::ZeroEngine::plan(cfg, opt, comm.size());
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, comm.local_rank() % count));
  if (root) {
    std::printf("[bench] %s x %d rank%s | %s shape: %.3f B parameters | seq %lld per rank | %s | recompute %s%s | "
                "offload %s | weights %s | grad reduce %s%s%s\n",
                prop.name, comm.size(), comm.size() == 1 ? "" : "s", model.c_str(), double(table.num_parameters()) / 1e9,
                (long long)seq, dtype.c_str(), opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer",
                activation_options_text(opt.model).c_str(), offload.c_str(),
                opt.weights == gpu::WeightPlace::kResident ? "resident" : "streamed",
                comm.size() == 1 ? "unused (one rank)" : grad_reduce.c_str(), mem_limit.empty() ? "" : " | gpu-mem-limit ",
                mem_limit.c_str());
    std::printf("[bench] memory plan per rank: %s\n", plan.describe().c_str());
  }
  gpu::check_host_memory(plan, comm);
  const AdamWConfig adamw{1e-5, 0.9, 0.999, 1e-8, 0.01, 1.0};
  ShardedTrainState state(table, comm, adamw, NumaPlacement{},
                          opt.optimizer == gpu::OptimizerPlace::kHost ? opt.host_grad_dtype : DType::F32);
  init_random_shard(state, table, 1234, 0.02f);
  gpu::ZeroEngine engine(cfg, table, adamw, opt, state);

  const std::vector<PackedBatch> batch = {random_batch(cfg, seq, comm.rank())};
  double targets = double(batch[0].num_targets());
  comm.all_reduce_sum(&targets, 1);
  std::vector<double> times, compute, cpu_opt, wait_w, wait_g, comm_s, comm_b;
  LossSum loss;
  for (int64_t s = 1; s <= steps; ++s) {
    comm.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    engine.train_step(batch, int64_t(targets), s, 1e-5, &loss);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // The slowest rank sets the pace.
    double v[1] = {secs};
    comm.all_reduce_max(v, 1);
    times.push_back(v[0]);
    const gpu::ZeroTimeline& t = engine.timeline();
    compute.push_back(t.gpu_compute), cpu_opt.push_back(t.cpu_optimizer), wait_w.push_back(t.wait_weights),
        wait_g.push_back(t.wait_grads), comm_s.push_back(t.comm), comm_b.push_back(t.comm_bytes);
    if (root)
      std::printf("[bench] step %lld: %.3f s, loss %.4f | gpu compute %.3f s, cpu optimizer %.3f s, waiting for "
                  "weights %.3f s, for gradients %.3f s\n",
                  (long long)s, times.back(), loss.mean(), t.gpu_compute, t.cpu_optimizer, t.wait_weights, t.wait_grads);
  }
  engine.sync_state();
  const auto from = [&](const std::vector<double>& v) { return std::vector<double>(v.begin() + warmup, v.end()); };
  const double step_s = median(from(times));
  const double tps = double(seq) * comm.size() / step_s;
  const double fpt = model_flops_per_token(cfg, seq);
  double peak[1] = {double(engine.peak_device_bytes()) / double(1ull << 30)};
  comm.all_reduce_max(peak, 1);
  const NumaUsage numa = host_memory_per_node();
  int node_ranks = 0;
  const NumaUsage node_numa = node_host_memory_per_numa(comm, &node_ranks);  // collective
  const double rs_s = median(from(comm_s));
  const double algbw = rs_s > 0 ? comm_b.back() / rs_s / 1e9 : 0.0;  // the same bytes every step
  if (root) {
    std::printf("RESULT {\"engine\":\"longtune\",\"model\":\"%s\",\"seq\":%lld,\"mode\":\"%s\",\"world\":%d,"
                "\"dtype\":\"%s\",\"recompute\":\"%s\",\"weights\":\"%s\",\"gpu_mem_limit\":\"%s\",\"step_s\":%.4f,"
                "\"tokens_per_s\":%.1f,\"tokens_per_s_per_gpu\":%.1f,\"mfu_vs_790\":%.3f,\"peak_gib\":%.2f,"
                "\"planned_device_gib\":%.2f,\"gpu_compute_s\":%.4f,\"cpu_optimizer_s\":%.4f,\"wait_weights_s\":%.4f,"
                "\"wait_grads_s\":%.4f,\"delayed_update\":%s,\"host_grad_dtype\":\"%s\",\"host_weights\":\"%s\",\"grad_reduce_dtype\":\"%s\",\"reduce_scatter_s\":%.4f,\"reduce_scatter_algbw_gbps\":%.1f,"
                "\"reduce_scatter_busbw_gbps\":%.1f,\"host_gib\":%.2f,\"node_host_gib\":%.2f,\"offload_activations\":%s,\"mlp_chunk\":%lld,"
                "\"planned_host_pinned_gib\":%.2f,\"loss\":%.4f}\n",
                model.c_str(), (long long)seq, offload == "none" ? "gpu" : "offload", comm.size(), dtype.c_str(),
                opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer",
                opt.weights == gpu::WeightPlace::kResident ? "resident" : "streamed", mem_limit.c_str(), step_s, tps,
                tps / comm.size(), tps / comm.size() * fpt / 790e12, peak[0],
                double(plan.device_total()) / double(1ull << 30), median(from(compute)), median(from(cpu_opt)),
                median(from(wait_w)), median(from(wait_g)), delayed ? "true" : "false", host_grad.c_str(),
                host_weights.c_str(), grad_reduce.c_str(), median(from(comm_s)),
                algbw, algbw * double(comm.size() - 1) / double(comm.size()), double(numa.total()) / double(1ull << 30),
                double(node_numa.total()) / double(1ull << 30), opt.model.offload_activations ? "true" : "false", (long long)effective_mlp_chunk(opt.model),
                double(plan.host_pinned) / double(1ull << 30), loss.mean());
    std::printf("[RESULT] peak VRAM per GPU: %.2f GiB (planned %.2f GiB)\n", peak[0],
                double(plan.device_total()) / double(1ull << 30));
    std::printf("[RESULT] average iteration latency: %.4f s (median of %zu)\n", step_s, times.size() - size_t(warmup));
    std::printf("[RESULT] tokens per iteration: %lld\n", (long long)(seq * comm.size()));
    std::printf("[RESULT] throughput: %.1f tokens/s\n", tps);
    std::printf("[RESULT] %s (the %d rank(s) on rank 0's host; planned %.2f GiB per rank)\n",
                format_numa_usage(node_numa).c_str(), node_ranks, double(plan.host_total()) / double(1ull << 30));
    std::printf("[bench] rank 0 alone: %s\n", format_numa_usage(numa).c_str());
  }
  return 0;
}

}  // namespace

int run_bench_train(int argc, char** argv) {
  BenchTrainArgs a;
  po::options_description desc("longtune bench train: single-GPU training step on a Llama shape (random weights)");
  desc.add_options()("help,h", "this text")
      ("model", po::value(&a.model)->default_value(a.model), "1b | 3b | 8b (Llama 3.x shapes) or a model directory")
      ("seq-len", po::value(&a.seq)->default_value(a.seq), "tokens per step (one sequence)")
      ("steps", po::value(&a.steps)->default_value(a.steps), "steps in all (the median of those after --warmup is reported)")
      ("warmup", po::value(&a.warmup)->default_value(a.warmup), "untimed first steps")
      ("dtype", po::value(&a.dtype)->default_value(a.dtype), "bf16 | fp16")
      ("recompute", po::value(&a.recompute)->default_value(a.recompute),
       "none (keep activations) | layer (keep layer inputs, recompute) | auto (none when it fits)")
      ("attention", po::value(&a.attention)->default_value(a.attention), "attention kernel: auto | tensor-core | sm75 (fp16) | cudnn")
      ("nondeterministic-attention", po::bool_switch(&a.nondet), "fp32 atomics in attention backward (faster)")
      ("offload", po::value(&a.offload)->default_value(a.offload),
       "none | optimizer (fp32 state and AdamW on the host) | params (and the weights streamed from the host)")
      ("weights", po::value(&a.weights)->default_value(a.weights), "resident | streamed (per layer, ZeRO-3)")
      ("gpu-mem-limit", po::value(&a.mem_limit), "cap this rank's device memory, e.g. 16GiB")
      ("delayed-update", po::bool_switch(&a.delayed), "--offload optimizer: overlap the CPU update with the next step (DPU)")
      ("offload-activations", po::bool_switch(&a.offload_activations),
       "recompute layer/auto: the saved layer inputs in pinned host memory (auto drops it when it keeps everything)")
      ("mlp-chunk", po::value(&a.mlp_chunk)->default_value(a.mlp_chunk), "recompute layer/auto: tokens per MLP tile (0: one tile)")
      ("threads", po::value(&a.threads)->default_value(a.threads), "host threads for the CPU optimizer (0: all)")
      ("grad-reduce-dtype", po::value(&a.grad_reduce)->default_value(a.grad_reduce),
       "fp32 | bf16 (half the bytes of the gradient reduce-scatter; summed in bf16; one rank: unused)")
      ("host-grad-dtype", po::value(&a.host_grad)->default_value(a.host_grad), "--offload: host gradients fp32 | bf16")
      ("host-weights", po::value(&a.host_weights)->default_value(a.host_weights),
       "--offload: copy (bf16 copy of the shard on the host) | master (fetch the fp32 master, convert on the GPU)");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;
  if (a.seq < 2) throw ConfigError("--seq-len: expected at least 2, got " + std::to_string(a.seq));
  if (a.steps <= a.warmup) throw ConfigError("--steps: expected more than --warmup");
  if (a.mlp_chunk < 0) throw ConfigError("--mlp-chunk: expected a token count >= 0 (0: no tiling), got " + std::to_string(a.mlp_chunk));
  (void)gpu::ZeroEngine::grad_wire_dtype_from_name(a.grad_reduce);  // refused before looking for a GPU
  if (cuda::device_count() == 0) throw ConfigError("bench train: expected a CUDA GPU, found none");

  const LlamaConfig cfg = gpu::llama_shape_by_name(a.model);
  const ParamTable table(cfg);
  std::unique_ptr<Comm> comm = make_comm();
  if (comm->size() > 1 || a.offload != "none" || a.weights != "resident" || !a.mem_limit.empty() || a.delayed)
    return run_bench_train_sharded(cfg, table, *comm, a);
  gpu::GpuEngineOptions opt;
  if (a.dtype == "bf16") opt.model.compute_dtype = DType::BF16;
  else if (a.dtype == "fp16") opt.model.compute_dtype = DType::F16;
  else throw ConfigError("--dtype: expected bf16 or fp16, got " + a.dtype);
  opt.model.max_tokens = a.seq;
  opt.model.nondeterministic_attention = a.nondet;
  opt.model.attention_kernel = gpu::attention_kernel_from_name(a.attention);
  opt.model.offload_activations = a.offload_activations;
  opt.model.mlp_chunk = a.mlp_chunk;
  gpu::GpuEngine::apply_recompute(a.recompute, cfg, &opt);
  const gpu::GpuMemoryPlan plan = gpu::GpuEngine::plan(cfg, opt);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("[bench] %s | %s shape: %.3f B parameters | seq %lld | %s | recompute %s%s | attention %s%s\n",
              prop.name, a.model.c_str(), double(table.num_parameters()) / 1e9, (long long)a.seq, a.dtype.c_str(),
              opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer", activation_options_text(opt.model).c_str(),
              a.attention.c_str(), a.nondet ? " (nondeterministic dq)" : "");
  std::printf("[bench] memory plan: %s\n", plan.describe().c_str());

  gpu::GpuEngine engine(cfg, table, AdamWConfig{1e-5, 0.9, 0.999, 1e-8, 0.01, 1.0}, opt);
  engine.init_random(1234);

  const PackedBatch b = random_batch(cfg, a.seq, 0);
  const int64_t targets = b.num_targets();

  std::vector<double> times;
  LossSum loss;
  for (int64_t s = 1; s <= a.steps; ++s) {
    engine.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    loss = engine.accumulate(b, targets);
    engine.optimizer_step(s, 1e-5);
    engine.synchronize();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::printf("[bench] step %lld: %.3f s, loss %.4f\n", (long long)s, times.back(), loss.mean());
  }
  std::vector<double> timed(times.begin() + a.warmup, times.end());
  std::sort(timed.begin(), timed.end());
  const double step_s = timed[timed.size() / 2];
  const double tps = double(a.seq) / step_s;
  const double fpt = model_flops_per_token(cfg, a.seq);
  const double peak_gib = double(engine.peak_device_bytes()) / double(1ull << 30);
  std::printf("RESULT {\"engine\":\"longtune\",\"model\":\"%s\",\"seq\":%lld,\"mode\":\"gpu\",\"dtype\":\"%s\","
              "\"recompute\":\"%s\",\"step_s\":%.4f,\"tokens_per_s\":%.1f,\"mfu_vs_790\":%.3f,\"mfu_vs_989\":%.3f,"
              "\"peak_gib\":%.2f,\"planned_device_gib\":%.2f,\"offload_activations\":%s,\"mlp_chunk\":%lld,"
              "\"planned_host_pinned_gib\":%.2f,\"loss\":%.4f}\n",
              a.model.c_str(), (long long)a.seq, a.dtype.c_str(),
              opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer", step_s, tps, tps * fpt / 790e12,
              tps * fpt / 989e12, peak_gib, double(plan.total()) / double(1ull << 30),
              opt.model.offload_activations ? "true" : "false", (long long)effective_mlp_chunk(opt.model),
              double(plan.host_pinned) / double(1ull << 30), loss.mean());
  // The brief's benchmark-mode lines.
  std::printf("[RESULT] peak VRAM per GPU: %.2f GiB\n", peak_gib);
  std::printf("[RESULT] average iteration latency: %.4f s (median of %zu)\n", step_s, timed.size());
  std::printf("[RESULT] tokens per iteration: %lld\n", (long long)a.seq);
  std::printf("[RESULT] throughput: %.1f tokens/s\n", tps);
  std::printf("[RESULT] %s\n", format_numa_usage(host_memory_per_node()).c_str());  // "host memory per NUMA node: ..."
  return 0;
}

}  // namespace longtune::cli
