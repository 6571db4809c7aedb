// What the trainer needs from an accelerator engine, so trainer.cpp stays free of CUDA: the GPU
// engine (src/gpu) implements it in CUDA builds; elsewhere make_device_engine() explains that the
// build has no GPU support. The host ShardedTrainState stays the checkpointed copy of the state:
// the engine takes it at start (upload) and hands it back before every checkpoint (download).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/data/packed_batch.hpp"
#include "src/model/llama_cpu.hpp"
#include "src/optim/adamw.hpp"
#include "src/train/train_config.hpp"

namespace longtune {

class ParamTable;

struct DeviceStepResult {
  LossSum loss;              // over the whole global batch (all ranks)
  int64_t tokens = 0;        // packed tokens of the whole global batch (0 when skipped for lack of targets)
  AdamWStepInfo optim;
  bool skipped = false;      // fp16 overflow: no update this step
  double loss_scale = 1.0;
};

class DeviceEngine {
 public:
  virtual ~DeviceEngine() = default;
  // This rank's shard of the flat arrays (ShardLayout; one rank: the whole ParamTable layout). The
  // sharded engine works on the ShardedTrainState's own arrays: these calls then only synchronize.
  virtual void upload_state(const float* master, const float* exp_avg, const float* exp_avg_sq) = 0;
  virtual void download_state(float* master, float* exp_avg, float* exp_avg_sq) = 0;
  virtual DeviceStepResult train_step(const std::vector<PackedBatch>& micro_batches, int64_t global_targets,
                                      int64_t step, double lr) = 0;
  virtual LossSum evaluate(const PackedBatch& batch) = 0;
  virtual double loss_scale() const = 0;
  virtual void set_loss_scale(double scale) = 0;
  // One line for the start of the run: device, dtype, memory plan.
  virtual std::string describe() const = 0;
  virtual double peak_memory_gib() const = 0;
  // Model FLOPs per second at 100% MFU (the device's bf16/fp16 dense peak).
  virtual double peak_flops() const = 0;
  // Extra fields for the step's metrics line (JSON members without braces, leading comma), e.g. the
  // offload timeline; empty when the engine has none.
  virtual std::string step_metrics_json() const { return ""; }
};

// Preflight for cfg.device ("cuda"), run before anything is loaded: a GPU is visible, this build has
// CUDA, the dtype suits the GPU. Throws ConfigError.
void check_device(const TrainConfig& cfg);

// The options the engine is built from: `train`'s [gpu] section, or `eval`'s --device/--dtype/--attention.
struct DeviceEngineOptions {
  std::string device = "cuda";     // what the user asked for (the stub's error names it)
  std::string dtype = "bf16";      // bf16 | fp16
  std::string recompute = "auto";  // none | layer | auto (none when the plan fits)
  std::string attention = "auto";  // auto | tensor-core | sm75 | cudnn
  std::string offload = "none";    // none | optimizer | params
  std::string weights = "resident";  // resident | streamed
  bool delayed_update = false;      // offload optimizer only
  std::string grad_reduce_dtype = "fp32";  // fp32 | bf16: the gradient reduce-scatter between ranks
  int64_t gpu_mem_limit = 0;       // bytes this rank may use on its GPU (0: all)
  std::string host_grad_dtype = "fp32";  // offload only: fp32 | bf16
  std::string host_weights = "copy";     // offload only: copy | master
  bool offload_activations = false; // layer inputs in pinned host memory (recompute layer; auto drops it with none)
  int64_t mlp_chunk = 0;           // tokens per MLP tile (recompute layer; 0: one tile)
  int64_t max_tokens = 0;          // rows x seq_len of the largest micro-batch
  AdamWConfig adamw;               // training only (evaluation uploads weights, never steps)
};

// The engine options of a training run.
DeviceEngineOptions device_engine_options(const TrainConfig& cfg);

class ShardedTrainState;
class Comm;

// The engine for opt.device ("cuda") on GPU local_rank of this node: the single-GPU engine, or the
// sharded one (src/gpu/zero_engine.hpp) for several ranks or any offload, working on `state`.
// Throws ConfigError when this build or machine cannot run it, or when the run does not fit (with
// the memory plan's numbers), before any step.
std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& opt, const LlamaConfig& model_cfg,
                                                 const ParamTable& table, ShardedTrainState& state);
// Before the state is allocated: the host memory the run's plan needs per rank, times the ranks on
// this node, against what the node has available. ConfigError on every rank (collective) with the
// plan's numbers when it does not fit. No-op for the single-GPU engine and in CPU-only builds.
void check_host_memory(const DeviceEngineOptions& opt, const LlamaConfig& model_cfg, Comm& comm);
// The single-GPU engine on GPU 0 with its own state (evaluation: upload weights, forward only).
std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& opt, const LlamaConfig& model_cfg,
                                                 const ParamTable& table);

}  // namespace longtune
