// longtune plan: will a run fit, and how? For a model, a sequence length, a world size and the GPU
// and host memory budgets, it predicts each rank's peak device memory and host memory under every
// placement the engines offer, fastest first, picks the fastest that fits, and finds the longest
// sequence each placement can train. The numbers are the engines' own plans (GpuEngine::plan,
// ZeroEngine::plan): the same counting passes that size their allocations, so what `plan` says is what
// `train` allocates (and refuses on) -- docs/planner.md has the measured accuracy.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "src/cli/bench.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/gpu/device_memory.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/model_shapes.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/model/param_table.hpp"
#include "src/train/train_config.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

namespace {

// The CUDA context and the driver's own allocations, which every process pays before the engine
// allocates anything (measured: about 0.5 GiB on an H100/H200 with CUDA 13).
constexpr double kContextBytes = 0.55 * double(1ull << 30);
// Host memory the OS and the process itself (binary, MPI, HDF5, data) need beside the plan.
constexpr double kHostReserve = 0.08;

struct Placement {
  std::string name;     // as the user would type it: --offload X --weights Y --recompute Z
  std::string offload;  // none | optimizer | params
  std::string weights;  // resident | streamed
  gpu::Recompute recompute;
};

struct Prediction {
  double device = 0, host = 0;  // bytes per rank
  std::string detail;
};

Prediction predict(const LlamaConfig& cfg, const Placement& p, int64_t tokens, int world, DType dtype) {
  Prediction r;
  gpu::GpuModelOptions m;
  m.compute_dtype = dtype;
  m.max_tokens = tokens;
  m.recompute = p.recompute;
  const ParamTable table(cfg);
  if (world == 1 && p.offload == "none" && p.weights == "resident") {
    gpu::GpuEngineOptions o;
    o.model = m;
    const gpu::GpuMemoryPlan plan = gpu::GpuEngine::plan(cfg, o);
    r.device = double(plan.total());
    // The trainer's host copy of the state (checkpoints, evaluation): 4 fp32 arrays.
    r.host = double(HostArena::bytes_for(std::vector<size_t>(4, size_t(table.total_elements()) * 4)));
    r.detail = plan.describe();
    return r;
  }
  gpu::ZeroEngineOptions o;
  o.model = m;
  o.optimizer = p.offload == "none" ? gpu::OptimizerPlace::kDevice : gpu::OptimizerPlace::kHost;
  o.weights = (p.offload == "params" || p.weights == "streamed") ? gpu::WeightPlace::kStreamed
                                                                   : gpu::WeightPlace::kResident;
  const gpu::ZeroMemoryPlan plan = gpu::ZeroEngine::plan(cfg, o, world);
  r.device = double(plan.device_total());
  r.host = double(plan.host_total());
  r.detail = plan.describe();
  return r;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", bytes / double(1ull << 30));
  return buf;
}

}  // namespace

int run_plan(int argc, char** argv) {
  std::string model = "8b", gpu_mem = "80GiB", host_mem = "128GiB", dtype_name_s = "bf16";
  int64_t seq = 0, micro = 1, max_seq = 1 << 20;
  int gpus = 1, gpus_per_node = 0;
  po::options_description desc(
      "longtune plan: predicted device and host memory per rank for each placement of weights, optimizer\n"
      "and activations (fastest first), the fastest that fits, and the longest --seq-len each can train.\n\nOptions");
  desc.add_options()("help,h", "this text")
      ("model", po::value(&model)->default_value(model), "1b | 3b | 8b (Llama 3.x shapes) or a model directory")
      ("seq-len", po::value(&seq), "tokens per sequence to check (default: only search the longest)")
      ("micro-batch", po::value(&micro)->default_value(micro), "sequences per forward/backward")
      ("gpus", po::value(&gpus)->default_value(gpus), "ranks (one GPU each)")
      ("gpus-per-node", po::value(&gpus_per_node), "ranks sharing one host's memory (default: min(--gpus, 8))")
      ("gpu-mem", po::value(&gpu_mem)->default_value(gpu_mem), "memory of one GPU, e.g. 16GiB (V100), 48GiB (A6000)")
      ("host-mem", po::value(&host_mem)->default_value(host_mem), "host memory of one node")
      ("dtype", po::value(&dtype_name_s)->default_value(dtype_name_s), "bf16 | fp16")
      ("max-seq", po::value(&max_seq)->default_value(max_seq), "upper end of the longest-sequence search");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;
  if (gpus < 1) throw ConfigError("--gpus: expected at least 1, got " + std::to_string(gpus));
  if (micro < 1) throw ConfigError("--micro-batch: expected at least 1, got " + std::to_string(micro));
  if (vm.count("seq-len") && seq < 2) throw ConfigError("--seq-len: expected at least 2, got " + std::to_string(seq));
  if (gpus_per_node <= 0) gpus_per_node = std::min(gpus, 8);
  DType dtype = DType::BF16;
  if (dtype_name_s == "fp16") dtype = DType::F16;
  else if (dtype_name_s != "bf16") throw ConfigError("--dtype: expected bf16 or fp16, got '" + dtype_name_s + "'");
  const double device_budget = double(parse_byte_size(gpu_mem, "--gpu-mem")) - kContextBytes;
  const double host_budget = double(parse_byte_size(host_mem, "--host-mem")) * (1.0 - kHostReserve);
  const LlamaConfig cfg = gpu::llama_shape_by_name(model);
  const ParamTable table(cfg);

  const std::vector<Placement> placements = {
      {"all on GPU, keep activations", "none", "resident", gpu::Recompute::kNone},
      {"all on GPU, recompute per layer", "none", "resident", gpu::Recompute::kLayer},
      {"ZeRO-3 weights, recompute per layer", "none", "streamed", gpu::Recompute::kLayer},
      {"offload optimizer, keep activations", "optimizer", "resident", gpu::Recompute::kNone},
      {"offload optimizer, recompute per layer", "optimizer", "resident", gpu::Recompute::kLayer},
      {"offload optimizer + params, recompute per layer", "params", "streamed", gpu::Recompute::kLayer},
  };
  std::printf("[plan] %s: %.3f B parameters, %d rank%s (%d per node), GPU %s, host %s per node, %s\n", model.c_str(),
              double(table.num_parameters()) / 1e9, gpus, gpus == 1 ? "" : "s", gpus_per_node, gpu_mem.c_str(),
              host_mem.c_str(), dtype_name_s.c_str());
  std::printf("[plan] budgets: device %s GiB per rank (the GPU less %.2f GiB of CUDA context), host %s GiB per node "
              "(%.0f%% kept for the system)\n",
              gib(device_budget).c_str(), kContextBytes / double(1ull << 30), gib(host_budget).c_str(), kHostReserve * 100);
  const auto fits = [&](const Placement& p, int64_t s) {
    const Prediction pr = predict(cfg, p, s * micro, gpus, dtype);
    return pr.device <= device_budget && pr.host * gpus_per_node <= host_budget;
  };
  int chosen = -1;
  std::printf("\n%-48s %12s %14s %6s %14s\n", "placement", "device GiB", "host GiB/node", "fits", "longest seq");
  for (size_t i = 0; i < placements.size(); ++i) {
    const Placement& p = placements[i];
    // Longest sequence, in multiples of 1024 tokens: memory grows monotonically with it.
    int64_t lo = 0, hi = max_seq / 1024;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (fits(p, mid * 1024)) lo = mid;
      else hi = mid - 1;
    }
    const int64_t longest = lo * 1024;
    std::string dev = "-", host = "-", ok = "-";
    if (seq > 0) {
      const Prediction pr = predict(cfg, p, seq * micro, gpus, dtype);
      dev = gib(pr.device);
      host = gib(pr.host * gpus_per_node);
      ok = fits(p, seq) ? "yes" : "no";
      if (ok == "yes" && chosen < 0) chosen = int(i);
    }
    std::printf("%-48s %12s %14s %6s %14s\n", p.name.c_str(), dev.c_str(), host.c_str(), ok.c_str(),
                longest > 0 ? std::to_string(longest).c_str() : "none");
  }
  if (seq > 0) {
    if (chosen < 0) {
      std::printf("\n[plan] seq %lld does not fit any placement at these budgets\n", (long long)seq);
      return 3;
    }
    const Placement& p = placements[size_t(chosen)];
    const Prediction pr = predict(cfg, p, seq * micro, gpus, dtype);
    std::printf("\n[plan] fastest placement that fits seq %lld: %s\n", (long long)seq, p.name.c_str());
    std::printf("[plan]   train options: --offload %s --weights %s --recompute %s --seq-len %lld --micro-batch %lld\n",
                p.offload.c_str(), p.weights.c_str(), p.recompute == gpu::Recompute::kNone ? "none" : "layer",
                (long long)seq, (long long)micro);
    std::printf("[plan]   per rank: %s\n", pr.detail.c_str());
  }
  return 0;
}

}  // namespace longtune::cli
