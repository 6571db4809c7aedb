// longtune plan: will a run fit, and how? For a model, a sequence length, a world size and the GPU
// and host memory budgets, it predicts each rank's peak device memory and host memory under every
// placement the engines offer, fastest first, picks the fastest that fits, and finds the longest
// sequence each placement can train. The numbers are the engines' own plans (GpuEngine::plan,
// ZeroEngine::plan): the same counting passes that size their allocations, so what `plan` says is what
// `train` allocates (and refuses on) -- docs/offload.md has the measured accuracy.
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
#include "src/gpu/plan.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/model/param_table.hpp"
#include "src/train/train_config.hpp"

namespace po = boost::program_options;

namespace longtune::gpu {

std::string Placement::train_options() const {
  std::string s = "--offload " + offload + " --weights " + weights + " --recompute " +
                  (recompute == Recompute::kNone ? "none" : "layer");
  if (offload_activations) s += " --offload-activations true";
  if (mlp_chunk > 0) s += " --mlp-chunk " + std::to_string(mlp_chunk);
  if (lean_host) s += " --host-grad-dtype bf16 --host-weights master";
  return s;
}

std::vector<Placement> plan_placements(int64_t mlp_chunk) {
  const auto keep = [](std::string name, std::string offload, std::string weights) {
    return Placement{std::move(name), std::move(offload), std::move(weights), Recompute::kNone, false, 0, false};
  };
  const auto layer = [](std::string name, std::string offload, std::string weights) {
    return Placement{std::move(name), std::move(offload), std::move(weights), Recompute::kLayer, false, 0, false};
  };
  const auto to_host = [&](const Placement& p, std::string name) {
    Placement q = p;
    q.name = std::move(name);
    q.offload_activations = true;
    q.mlp_chunk = mlp_chunk;
    return q;
  };
  const auto tiles = [&](const Placement& p, std::string name) {
    Placement q = p;
    q.name = std::move(name);
    q.mlp_chunk = mlp_chunk;
    return q;
  };
  // The offload placements, then the same with the lean host state.
  const auto with_lean = [](std::vector<Placement> ps) {
    const size_t n = ps.size();
    for (size_t i = 0; i < n; ++i) {
      Placement q = ps[i];
      q.name += ", lean host";
      q.lean_host = true;
      ps.push_back(q);
    }
    return ps;
  };
  const Placement gpu = layer("all on GPU, recompute per layer", "none", "resident");
  const Placement zero3 = layer("ZeRO-3 weights, recompute per layer", "none", "streamed");
  const Placement opt = layer("offload optimizer, recompute per layer", "optimizer", "resident");
  const Placement params = layer("offload optimizer + params, recompute per layer", "params", "streamed");
  std::vector<Placement> all = {
      keep("all on GPU, keep activations", "none", "resident"),
      gpu,
      to_host(gpu, "all on GPU, recompute, activations to host"),
      zero3,
      to_host(zero3, "ZeRO-3 weights, recompute, activations to host"),
      keep("offload optimizer, keep activations", "optimizer", "resident"),
  };
  for (const Placement& p : {opt, params})
    for (const Placement& q : with_lean({p, tiles(p, p.name + ", MLP tiles"),
                                         to_host(p, p.name + ", activations to host")}))
      all.push_back(q);
  return all;
}

PlanBudget plan_budget(double gpu_mem, double host_mem, int world, int ranks_per_node, int64_t micro_batch,
                       DType dtype) {
  PlanBudget b;
  b.device = gpu_mem - kPlanContextBytes;
  b.host = host_mem * (1.0 - kPlanHostReserve);
  b.world = world;
  b.ranks_per_node = ranks_per_node;
  b.micro_batch = micro_batch;
  b.dtype = dtype;
  return b;
}

PlanPrediction predict_memory(const LlamaConfig& cfg, const Placement& p, int64_t tokens, int world, DType dtype) {
  PlanPrediction r;
  GpuModelOptions m;
  m.compute_dtype = dtype;
  m.max_tokens = tokens;
  m.recompute = p.recompute;
  m.offload_activations = p.offload_activations;
  m.mlp_chunk = p.mlp_chunk;
  const ParamTable table(cfg);
  if (world == 1 && p.offload == "none" && p.weights == "resident") {
    GpuEngineOptions o;
    o.model = m;
    const GpuMemoryPlan plan = GpuEngine::plan(cfg, o);
    r.device = double(plan.total());
    // The trainer's host copy of the state (checkpoints, evaluation): 4 fp32 arrays; and the
    // offloaded layer inputs.
    r.host = double(HostArena::bytes_for(std::vector<size_t>(4, size_t(table.total_elements()) * 4))) +
             double(plan.host_pinned);
    r.detail = plan.describe();
    return r;
  }
  ZeroEngineOptions o;
  o.model = m;
  o.optimizer = p.offload == "none" ? OptimizerPlace::kDevice : OptimizerPlace::kHost;
  o.weights = (p.offload == "params" || p.weights == "streamed") ? WeightPlace::kStreamed : WeightPlace::kResident;
  if (p.lean_host) {
    o.host_grad_dtype = DType::BF16;
    o.fetch_from_master = true;
  }
  const ZeroMemoryPlan plan = ZeroEngine::plan(cfg, o, world);
  r.device = double(plan.device_total());
  r.host = double(plan.host_total());
  r.detail = plan.describe();
  return r;
}

bool plan_fits(const LlamaConfig& cfg, const Placement& p, int64_t seq_len, const PlanBudget& budget) {
  const PlanPrediction pr = predict_memory(cfg, p, seq_len * budget.micro_batch, budget.world, budget.dtype);
  return pr.device <= budget.device && pr.host * budget.ranks_per_node <= budget.host;
}

int64_t longest_sequence(const LlamaConfig& cfg, const Placement& p, const PlanBudget& budget, int64_t max_seq) {
  // Binary search in multiples of 1024 tokens: device and host memory grow monotonically with it
  // (the host too: offloaded layer inputs are (L - 1) x T x C).
  int64_t lo = 0, hi = max_seq / 1024;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (plan_fits(cfg, p, mid * 1024, budget)) lo = mid;
    else hi = mid - 1;
  }
  return lo * 1024;
}

}  // namespace longtune::gpu

namespace longtune::cli {

namespace {

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", bytes / double(1ull << 30));
  return buf;
}

}  // namespace

int run_plan(int argc, char** argv) {
  std::string model = "8b", gpu_mem = "80GiB", host_mem = "128GiB", dtype_name_s = "bf16";
  int64_t seq = 0, micro = 1, max_seq = 1 << 20, mlp_chunk = gpu::kPlanMlpChunk;
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
      ("mlp-chunk", po::value(&mlp_chunk)->default_value(mlp_chunk),
       "tokens per MLP tile in the placements that put activations on the host")
      ("max-seq", po::value(&max_seq)->default_value(max_seq), "upper end of the longest-sequence search");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;
  if (gpus < 1) throw ConfigError("--gpus: expected at least 1, got " + std::to_string(gpus));
  if (micro < 1) throw ConfigError("--micro-batch: expected at least 1, got " + std::to_string(micro));
  if (vm.count("seq-len") && seq < 2) throw ConfigError("--seq-len: expected at least 2, got " + std::to_string(seq));
  if (mlp_chunk < 1) throw ConfigError("--mlp-chunk: expected a token count >= 1, got " + std::to_string(mlp_chunk));
  if (gpus_per_node <= 0) gpus_per_node = std::min(gpus, 8);
  DType dtype = DType::BF16;
  if (dtype_name_s == "fp16") dtype = DType::F16;
  else if (dtype_name_s != "bf16") throw ConfigError("--dtype: expected bf16 or fp16, got '" + dtype_name_s + "'");
  const gpu::PlanBudget budget =
      gpu::plan_budget(double(parse_byte_size(gpu_mem, "--gpu-mem")), double(parse_byte_size(host_mem, "--host-mem")),
                       gpus, gpus_per_node, micro, dtype);
  const LlamaConfig cfg = gpu::llama_shape_by_name(model);
  const ParamTable table(cfg);
  const std::vector<gpu::Placement> placements = gpu::plan_placements(mlp_chunk);

  std::printf("[plan] %s: %.3f B parameters, %d rank%s (%d per node), GPU %s, host %s per node, %s\n", model.c_str(),
              double(table.num_parameters()) / 1e9, gpus, gpus == 1 ? "" : "s", gpus_per_node, gpu_mem.c_str(),
              host_mem.c_str(), dtype_name_s.c_str());
  std::printf("[plan] budgets: device %s GiB per rank (the GPU less %.2f GiB of CUDA context), host %s GiB per node "
              "(%.0f%% kept for the system)\n",
              gib(budget.device).c_str(), gpu::kPlanContextBytes / double(1ull << 30), gib(budget.host).c_str(),
              gpu::kPlanHostReserve * 100);
  std::printf("[plan] activations to host: the layer inputs in pinned host memory, the MLP in tiles of %lld tokens\n",
              (long long)mlp_chunk);
  int width = int(std::string("placement").size());
  for (const gpu::Placement& p : placements) width = std::max(width, int(p.name.size()));
  int chosen = -1;
  std::printf("\n%-*s %12s %14s %6s %14s\n", width, "placement", "device GiB", "host GiB/node", "fits", "longest seq");
  for (size_t i = 0; i < placements.size(); ++i) {
    const gpu::Placement& p = placements[i];
    const int64_t longest = gpu::longest_sequence(cfg, p, budget, max_seq);
    std::string dev = "-", host = "-", ok = "-";
    if (seq > 0) {
      const gpu::PlanPrediction pr = gpu::predict_memory(cfg, p, seq * micro, gpus, dtype);
      dev = gib(pr.device);
      host = gib(pr.host * gpus_per_node);
      ok = gpu::plan_fits(cfg, p, seq, budget) ? "yes" : "no";
      if (ok == "yes" && chosen < 0) chosen = int(i);
    }
    std::printf("%-*s %12s %14s %6s %14s\n", width, p.name.c_str(), dev.c_str(), host.c_str(), ok.c_str(),
                longest > 0 ? std::to_string(longest).c_str() : "none");
  }
  if (seq > 0) {
    if (chosen < 0) {
      std::printf("\n[plan] seq %lld does not fit any placement at these budgets\n", (long long)seq);
      return 3;
    }
    const gpu::Placement& p = placements[size_t(chosen)];
    const gpu::PlanPrediction pr = gpu::predict_memory(cfg, p, seq * micro, gpus, dtype);
    std::printf("\n[plan] fastest placement that fits seq %lld: %s\n", (long long)seq, p.name.c_str());
    std::printf("[plan]   train options: %s --seq-len %lld --micro-batch %lld\n", p.train_options().c_str(),
                (long long)seq, (long long)micro);
    std::printf("[plan]   per rank: %s\n", pr.detail.c_str());
  }
  return 0;
}

}  // namespace longtune::cli
