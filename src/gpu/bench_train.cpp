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

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Several ranks (one GPU each, NCCL) and/or offload: gpu::ZeroEngine on a ShardedTrainState, as
// `train` builds it. Weak scaling: every rank trains on its own --seq-len tokens per step.
int run_bench_train_sharded(const LlamaConfig& cfg, const ParamTable& table, Comm& comm, const std::string& model,
                            int64_t seq, int64_t steps, int64_t warmup, const std::string& dtype,
                            const std::string& recompute, const std::string& attention, bool nondet,
                            const std::string& offload, const std::string& weights, const std::string& mem_limit,
                            int threads, bool delayed, const std::string& grad_reduce) {
  const bool root = comm.rank() == 0;
  const int count = cuda::device_count();
  if (comm.local_size() > count)
    throw ConfigError("bench train: expected one GPU per rank, got " + std::to_string(comm.local_size()) +
                      " ranks on this node and " + std::to_string(count) + " GPUs");
  CUDA_CHECK(cudaSetDevice(comm.local_rank() % count));
  if (!mem_limit.empty()) gpu::limit_device_memory(size_t(parse_byte_size(mem_limit, "--gpu-mem-limit")));
  KokkosScope kokkos(threads);
  gpu::ZeroEngineOptions opt;
  if (dtype == "bf16") opt.model.compute_dtype = DType::BF16;
  else if (dtype == "fp16") opt.model.compute_dtype = DType::F16;
  else throw ConfigError("--dtype: expected bf16 or fp16, got " + dtype);
  opt.model.max_tokens = seq;
  opt.model.nondeterministic_attention = nondet;
  opt.model.attention_kernel = gpu::attention_kernel_from_name(attention);
  opt.delayed_update = delayed;
  opt.grad_wire_dtype = gpu::ZeroEngine::grad_wire_dtype_from_name(grad_reduce);
  gpu::ZeroEngine::apply_placement(&opt, offload, weights, recompute, cfg, comm.size());
  const gpu::ZeroMemoryPlan plan = gpu::ZeroEngine::plan(cfg, opt, comm.size());
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, comm.local_rank() % count));
  if (root) {
    std::printf("[bench] %s x %d rank%s | %s shape: %.3f B parameters | seq %lld per rank | %s | recompute %s | "
                "offload %s | weights %s | grad reduce %s%s%s\n",
                prop.name, comm.size(), comm.size() == 1 ? "" : "s", model.c_str(), double(table.num_parameters()) / 1e9,
                (long long)seq, dtype.c_str(), opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer",
                offload.c_str(), opt.weights == gpu::WeightPlace::kResident ? "resident" : "streamed",
                comm.size() == 1 ? "unused (one rank)" : grad_reduce.c_str(), mem_limit.empty() ? "" : " | gpu-mem-limit ",
                mem_limit.c_str());
    std::printf("[bench] memory plan per rank: %s\n", plan.describe().c_str());
  }
  const AdamWConfig adamw{1e-5, 0.9, 0.999, 1e-8, 0.01, 1.0};
  ShardedTrainState state(table, comm, adamw);
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
  const double rs_s = median(from(comm_s));
  const double algbw = rs_s > 0 ? comm_b.back() / rs_s / 1e9 : 0.0;  // the same bytes every step
  if (root) {
    std::printf("RESULT {\"engine\":\"longtune\",\"model\":\"%s\",\"seq\":%lld,\"mode\":\"%s\",\"world\":%d,"
                "\"dtype\":\"%s\",\"recompute\":\"%s\",\"weights\":\"%s\",\"gpu_mem_limit\":\"%s\",\"step_s\":%.4f,"
                "\"tokens_per_s\":%.1f,\"tokens_per_s_per_gpu\":%.1f,\"mfu_vs_790\":%.3f,\"peak_gib\":%.2f,"
                "\"planned_device_gib\":%.2f,\"gpu_compute_s\":%.4f,\"cpu_optimizer_s\":%.4f,\"wait_weights_s\":%.4f,"
                "\"wait_grads_s\":%.4f,\"delayed_update\":%s,\"grad_reduce_dtype\":\"%s\",\"reduce_scatter_s\":%.4f,"
                "\"reduce_scatter_algbw_gbps\":%.1f,\"reduce_scatter_busbw_gbps\":%.1f,\"host_gib\":%.2f,\"loss\":%.4f}\n",
                model.c_str(), (long long)seq, offload == "none" ? "gpu" : "offload", comm.size(), dtype.c_str(),
                opt.model.recompute == gpu::Recompute::kNone ? "none" : "layer",
                opt.weights == gpu::WeightPlace::kResident ? "resident" : "streamed", mem_limit.c_str(), step_s, tps,
                tps / comm.size(), tps / comm.size() * fpt / 790e12, peak[0],
                double(plan.device_total()) / double(1ull << 30), median(from(compute)), median(from(cpu_opt)),
                median(from(wait_w)), median(from(wait_g)), delayed ? "true" : "false", grad_reduce.c_str(),
                median(from(comm_s)), algbw, algbw * double(comm.size() - 1) / double(comm.size()), double(numa.total()) / double(1ull << 30),
                loss.mean());
    std::printf("[RESULT] peak VRAM per GPU: %.2f GiB (planned %.2f GiB)\n", peak[0],
                double(plan.device_total()) / double(1ull << 30));
    std::printf("[RESULT] average iteration latency: %.4f s (median of %zu)\n", step_s, times.size() - size_t(warmup));
    std::printf("[RESULT] tokens per iteration: %lld\n", (long long)(seq * comm.size()));
    std::printf("[RESULT] throughput: %.1f tokens/s\n", tps);
    std::printf("[RESULT] %s (rank 0; planned host %.2f GiB per rank)\n", format_numa_usage(numa).c_str(),
                double(plan.host_total()) / double(1ull << 30));
  }
  return 0;
}

}  // namespace

int run_bench_train(int argc, char** argv) {
  std::string model = "1b", dtype = "bf16", recompute = "auto", attention = "auto", offload = "none",
              weights = "resident", mem_limit, grad_reduce = "fp32";
  int64_t seq = 16384, steps = 5, warmup = 2;
  int threads = 0;
  bool nondet = false, delayed = false;
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
      ("nondeterministic-attention", po::bool_switch(&nondet), "fp32 atomics in attention backward (faster)")
      ("offload", po::value(&offload)->default_value(offload),
       "none | optimizer (fp32 state and AdamW on the host) | params (and the weights streamed from the host)")
      ("weights", po::value(&weights)->default_value(weights), "resident | streamed (per layer, ZeRO-3)")
      ("gpu-mem-limit", po::value(&mem_limit), "cap this rank's device memory, e.g. 16GiB")
      ("delayed-update", po::bool_switch(&delayed), "--offload optimizer: overlap the CPU update with the next step (DPU)")
      ("grad-reduce-dtype", po::value(&grad_reduce)->default_value(grad_reduce),
       "fp32 | bf16 (half the bytes of the gradient reduce-scatter; summed in bf16; one rank: unused)")
      ("threads", po::value(&threads)->default_value(threads), "host threads for the CPU optimizer (0: all)");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;
  if (seq < 2) throw ConfigError("--seq-len: expected at least 2, got " + std::to_string(seq));
  if (steps <= warmup) throw ConfigError("--steps: expected more than --warmup");
  (void)gpu::ZeroEngine::grad_wire_dtype_from_name(grad_reduce);  // refused before looking for a GPU
  if (cuda::device_count() == 0) throw ConfigError("bench train: expected a CUDA GPU, found none");

  const LlamaConfig cfg = gpu::llama_shape_by_name(model);
  const ParamTable table(cfg);
  std::unique_ptr<Comm> comm = make_comm();
  if (comm->size() > 1 || offload != "none" || weights != "resident" || !mem_limit.empty() || delayed)
    return run_bench_train_sharded(cfg, table, *comm, model, seq, steps, warmup, dtype, recompute, attention, nondet,
                                   offload, weights, mem_limit, threads, delayed, grad_reduce);
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

  const PackedBatch b = random_batch(cfg, seq, 0);
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
