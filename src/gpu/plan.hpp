// longtune plan's model of a run (src/gpu/plan.cpp): the placements the engines offer, fastest
// first, each rank's predicted device and host memory under one of them, and the longest sequence
// that fits a budget. Pure functions of the model shape (no GPU needed): the numbers are the
// engines' own plans (GpuEngine::plan, ZeroEngine::plan).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "src/common/dtype.hpp"
#include "src/gpu/llama_gpu.hpp"
#include "src/model/llama_config.hpp"

namespace longtune::gpu {

// Tokens per MLP tile in the placements that offload activations. With the layer inputs on the
// host, what remains on the device grows with ~9 (T, C) streams plus q|k|v and the attention
// output per token, while the untiled MLP adds 12 * F bytes per token (gate|up, SwiGLU and their
// gradients: more than all the rest for Llama's F = 3.5 C). A 4096-token tile caps that at 12 * F *
// 4096 bytes (0.66 GiB for 8B, under a tenth of the rest at 64K tokens) while each tile's GEMMs stay
// 4096 x C x 2F (about 1 TFLOP for 8B): large enough for full tensor-core rate. 8192 would only
// double the tile's memory.
constexpr int64_t kPlanMlpChunk = 4096;

struct Placement {
  std::string name;     // one line of the table
  std::string offload;  // none | optimizer | params
  std::string weights;  // resident | streamed
  Recompute recompute = Recompute::kLayer;
  bool offload_activations = false;  // layer inputs in pinned host memory
  int64_t mlp_chunk = 0;             // tokens per MLP tile (0: one tile)
  bool lean_host = false;            // offload: bf16 host gradients, weights fetched from the fp32 master
  // The train options that select it: --offload X --weights Y --recompute Z [--offload-activations
  // true] [--mlp-chunk N] [--host-grad-dtype bf16 --host-weights master].
  std::string train_options() const;
};

// Every placement, fastest first. Each one that recomputes per layer is followed by the same one
// with the layer inputs on the host and the MLP in tiles of `mlp_chunk` tokens: the copies hide
// behind the layers' compute and the tiles' GEMMs stay large, so that costs less than the next
// placement's extra traffic (weights gathered per layer, the optimizer on the CPU). The offload
// placements also come with the MLP tiles alone (layer inputs kept on the GPU: no host memory for
// them, which an 8B model's host state leaves little of), and each of those with the lean host state
// (bf16 host gradients, no host weight copy: 14 instead of 18 bytes per parameter on the host).
std::vector<Placement> plan_placements(int64_t mlp_chunk = kPlanMlpChunk);

// The CUDA context and the driver's own allocations, which every process pays before the engine
// allocates anything (measured: about 0.5 GiB on an H100/H200 with CUDA 13).
constexpr double kPlanContextBytes = 0.55 * double(1ull << 30);
// Host memory the OS and the process itself (binary, MPI, HDF5, data) need beside the plan.
constexpr double kPlanHostReserve = 0.08;

struct PlanBudget {
  double device = 0;        // bytes per rank the engine may plan for (the GPU less the CUDA context)
  double host = 0;          // bytes per node (less what the system keeps)
  int world = 1;            // ranks
  int ranks_per_node = 1;   // ranks sharing one host's memory
  int64_t micro_batch = 1;  // sequences per forward/backward
  DType dtype = DType::BF16;
};
// The budget of GPUs of `gpu_mem` bytes and nodes of `host_mem` bytes: less the context and the
// system's reserve.
PlanBudget plan_budget(double gpu_mem, double host_mem, int world, int ranks_per_node, int64_t micro_batch,
                       DType dtype);

struct PlanPrediction {
  double device = 0, host = 0;  // bytes per rank
  std::string detail;           // the engine plan's describe()
};
PlanPrediction predict_memory(const LlamaConfig& cfg, const Placement& p, int64_t tokens, int world, DType dtype);
// Whether sequences of seq_len tokens fit the budget under p: device per rank, host per node.
bool plan_fits(const LlamaConfig& cfg, const Placement& p, int64_t seq_len, const PlanBudget& budget);
// The longest seq_len that fits, a multiple of 1024 up to max_seq (0: not even 1024 tokens).
int64_t longest_sequence(const LlamaConfig& cfg, const Placement& p, const PlanBudget& budget, int64_t max_seq);

}  // namespace longtune::gpu
