// The trainer's DeviceEngine on one GPU (src/train/device_engine.hpp), built on GpuEngine.
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/cuda_check.cuh"
#include "src/common/error.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/train/device_engine.hpp"
#include "src/train/sharded_state.hpp"

namespace longtune {

namespace {

// Dense bf16/fp16 tensor-core FLOP/s: per-SM rate per clock of the architecture x SMs x clock.
double device_peak_flops(int device) {
  cudaDeviceProp p{};
  CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  int clock_khz = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  const double per_sm_per_clock = p.major >= 9 ? 4096.0 : (p.major == 8 && p.minor == 0) ? 2048.0 : 1024.0;
  return per_sm_per_clock * double(p.multiProcessorCount) * double(clock_khz) * 1e3;
}

// What the model does with its activations, for the run's first line.
std::string activations_text(const gpu::GpuModelOptions& m) {
  if (m.recompute == gpu::Recompute::kNone) return "recompute none";
  std::string s = "recompute per layer";
  if (m.offload_activations) s += ", layer inputs in host memory";
  if (m.mlp_chunk > 0 && m.mlp_chunk < m.max_tokens) s += ", MLP tiles of " + std::to_string(m.mlp_chunk) + " tokens";
  return s;
}

std::string gpu_name(int device) {
  cudaDeviceProp p{};
  CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return "GPU " + std::to_string(device) + ": " + p.name + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) +
         ")";
}

class GpuDeviceEngine final : public DeviceEngine {
 public:
  GpuDeviceEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw,
                  const gpu::GpuEngineOptions& opt)
      : engine_(cfg, table, adamw, opt), opt_(opt) {
    CUDA_CHECK(cudaGetDevice(&device_));
    peak_flops_ = device_peak_flops(device_);
  }

  void upload_state(const float* master, const float* m, const float* v) override { engine_.upload_state(master, m, v); }
  void download_state(float* master, float* m, float* v) override { engine_.download_state(master, m, v); }

  DeviceStepResult train_step(const std::vector<PackedBatch>& micro_batches, int64_t global_targets, int64_t step,
                              double lr) override {
    DeviceStepResult r;
    r.loss_scale = engine_.loss_scale();
    if (global_targets == 0) {  // nothing to learn from: no update (as the CPU engine does)
      r.skipped = true;
      return r;
    }
    for (const PackedBatch& b : micro_batches) {
      r.loss += engine_.accumulate(b, global_targets);
      r.tokens += b.num_tokens();
    }
    const gpu::GpuStepInfo info = engine_.optimizer_step(step, lr);
    r.optim = info.optim;
    r.skipped = info.skipped;
    r.loss_scale = info.loss_scale;
    return r;
  }

  LossSum evaluate(const PackedBatch& batch) override { return engine_.evaluate(batch); }
  double loss_scale() const override { return engine_.loss_scale(); }
  void set_loss_scale(double s) override { engine_.set_loss_scale(s); }

  std::string describe() const override {
    return gpu_name(device_) + " | " + (opt_.model.compute_dtype == DType::F16 ? "fp16 + loss scaling" : "bf16") + " | " +
           activations_text(opt_.model) + " | memory: " + engine_.memory_plan().describe();
  }
  double peak_memory_gib() const override { return double(engine_.peak_device_bytes()) / double(1ull << 30); }
  double peak_flops() const override { return peak_flops_; }

 private:
  gpu::GpuEngine engine_;
  gpu::GpuEngineOptions opt_;
  int device_ = 0;
  double peak_flops_ = 0;
};

// Several ranks (NCCL) and/or ZeRO-Offload: gpu::ZeroEngine on the trainer's own shard.
class ZeroDeviceEngine final : public DeviceEngine {
 public:
  ZeroDeviceEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw,
                   const gpu::ZeroEngineOptions& opt, ShardedTrainState& state)
      : state_(state), engine_(cfg, table, adamw, opt, state), opt_(opt) {
    CUDA_CHECK(cudaGetDevice(&device_));
    peak_flops_ = device_peak_flops(device_);
  }

  void upload_state(const float* master, const float* m, const float* v) override {
    const size_t n = size_t(state_.shard_len());
    if (master != state_.master()) std::copy_n(master, n, state_.master());
    if (m && m != state_.exp_avg()) std::copy_n(m, n, state_.exp_avg());
    if (v && v != state_.exp_avg_sq()) std::copy_n(v, n, state_.exp_avg_sq());
    engine_.state_changed();
  }
  void download_state(float* master, float* m, float* v) override {
    engine_.sync_state();
    const size_t n = size_t(state_.shard_len());
    if (master && master != state_.master()) std::copy_n(state_.master(), n, master);
    if (m && m != state_.exp_avg()) std::copy_n(state_.exp_avg(), n, m);
    if (v && v != state_.exp_avg_sq()) std::copy_n(state_.exp_avg_sq(), n, v);
  }

  DeviceStepResult train_step(const std::vector<PackedBatch>& micro_batches, int64_t global_targets, int64_t step,
                              double lr) override {
    DeviceStepResult r;
    const gpu::GpuStepInfo info = engine_.train_step(micro_batches, global_targets, step, lr, &r.loss, &r.tokens);
    r.optim = info.optim;
    r.skipped = info.skipped;
    r.loss_scale = info.loss_scale;
    return r;
  }

  LossSum evaluate(const PackedBatch& batch) override { return engine_.evaluate(batch); }
  double loss_scale() const override { return engine_.loss_scale(); }
  void set_loss_scale(double s) override { engine_.set_loss_scale(s); }

  std::string describe() const override {
    const char* opt_place = opt_.optimizer == gpu::OptimizerPlace::kHost ? "optimizer on the host (ZeRO-Offload)"
                                                                          : "optimizer on the GPU";
    const char* w_place = opt_.weights == gpu::WeightPlace::kResident ? "weights resident" : "weights streamed per layer";
    return gpu_name(device_) + " | " + std::to_string(engine_.world()) + " rank" + (engine_.world() == 1 ? "" : "s") +
           " | " + (opt_.model.compute_dtype == DType::F16 ? "fp16 + loss scaling" : "bf16") + " | " +
           activations_text(opt_.model) + " | " + opt_place + " | " + w_place +
           (engine_.world() > 1 && opt_.grad_wire_dtype == DType::BF16 ? " | gradients reduced in bf16" : "") +
           (opt_.host_grad_dtype == DType::BF16 ? " | host gradients bf16" : "") +
           (opt_.fetch_from_master ? " | weights fetched from the fp32 master" : "") +
           " | memory per rank: " + engine_.memory_plan().describe();
  }
  double peak_memory_gib() const override { return double(engine_.peak_device_bytes()) / double(1ull << 30); }
  double peak_flops() const override { return peak_flops_; }
  std::string step_metrics_json() const override {
    const gpu::ZeroTimeline& t = engine_.timeline();
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  ",\"gpu_compute_s\":%.4f,\"cpu_optimizer_s\":%.4f,\"wait_grads_s\":%.4f,\"wait_weights_s\":%.4f,"
                  "\"exposed_s\":%.4f,\"comm_s\":%.4f",
                  t.gpu_compute, t.cpu_optimizer, t.wait_grads, t.wait_weights, std::max(0.0, t.step - t.gpu_compute),
                  t.comm);
    return buf;
  }

 private:
  ShardedTrainState& state_;
  gpu::ZeroEngine engine_;
  gpu::ZeroEngineOptions opt_;
  int device_ = 0;
  double peak_flops_ = 0;
};

}  // namespace

static void check_dtype(const std::string& dtype) {
  if (dtype != "bf16") return;
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  if (p.major < 8)
    throw ConfigError("--dtype bf16: expected a GPU of compute capability 8.0 or newer, got " + std::string(p.name) +
                      " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + "): use --dtype fp16");
}

void check_device(const TrainConfig& cfg) {
  if (cuda::device_count() == 0)
    throw ConfigError("--device cuda: expected a visible CUDA GPU, found none (CUDA_VISIBLE_DEVICES, driver?)");
  check_dtype(cfg.dtype);  // on the current GPU (0 before any rank picked its own)
}

namespace {

gpu::GpuModelOptions model_options(const DeviceEngineOptions& o) {
  gpu::GpuModelOptions m;
  m.compute_dtype = o.dtype == "fp16" ? DType::F16 : DType::BF16;
  m.max_tokens = o.max_tokens;
  m.attention_kernel = gpu::attention_kernel_from_name(o.attention);
  m.offload_activations = o.offload_activations;
  m.mlp_chunk = o.mlp_chunk;
  return m;
}

bool sharded_run(const DeviceEngineOptions& o, int world) {
  return world > 1 || o.offload != "none" || o.weights == "streamed" || o.delayed_update;
}

// The sharded engine's options from train's strings (ConfigError for bad ones). `recompute` may
// differ from o.recompute (the host check decides before the GPU can answer auto).
gpu::ZeroEngineOptions zero_options(const DeviceEngineOptions& o, const std::string& recompute,
                                    const LlamaConfig& model_cfg, int world) {
  gpu::ZeroEngineOptions opt;
  opt.model = model_options(o);
  opt.delayed_update = o.delayed_update;
  opt.grad_wire_dtype = gpu::ZeroEngine::grad_wire_dtype_from_name(o.grad_reduce_dtype);
  gpu::ZeroEngine::apply_placement(&opt, o.offload, o.weights, recompute, model_cfg, world);
  gpu::ZeroEngine::apply_host_state(&opt, o.host_grad_dtype, o.host_weights);
  return opt;
}

}  // namespace

void check_host_memory(const DeviceEngineOptions& o, const LlamaConfig& model_cfg, Comm& comm) {
  if (!sharded_run(o, comm.size())) return;  // one GPU, all on it: the trainer's own copy only
  // --recompute auto is decided on the GPU later; the host plan takes the layer recomputation (its
  // only host cost is the offloaded layer inputs, which auto drops when it keeps everything).
  const gpu::ZeroEngineOptions opt =
      zero_options(o, o.recompute == "auto" ? "layer" : o.recompute, model_cfg, comm.size());
  gpu::check_host_memory(gpu::ZeroEngine::plan(model_cfg, opt, comm.size()), comm);
}

std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& o, const LlamaConfig& model_cfg,
                                                 const ParamTable& table, ShardedTrainState& state) {
  Comm& comm = state.comm();
  const int count = cuda::device_count();
  if (count == 0)
    throw ConfigError("--device cuda: expected a visible CUDA GPU, found none (CUDA_VISIBLE_DEVICES, driver?)");
  // One rank per GPU: local rank i takes GPU i (Slurm's --gpus-per-task or CUDA_VISIBLE_DEVICES may
  // already have narrowed the list to one).
  if (comm.local_size() > count)
    throw ConfigError("--device cuda: expected one GPU per rank, got " + std::to_string(comm.local_size()) +
                      " ranks on this node and " + std::to_string(count) + " visible GPUs");
  CUDA_CHECK(cudaSetDevice(comm.local_rank() % count));
  if (o.gpu_mem_limit > 0) gpu::limit_device_memory(size_t(o.gpu_mem_limit));
  if (!sharded_run(o, comm.size())) return make_device_engine(o, model_cfg, table);
  check_dtype(o.dtype);
  return std::make_unique<ZeroDeviceEngine>(model_cfg, table, o.adamw,
                                            zero_options(o, o.recompute, model_cfg, comm.size()), state);
}

std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& o, const LlamaConfig& model_cfg,
                                                 const ParamTable& table) {
  if (cuda::device_count() == 0)
    throw ConfigError("--device cuda: expected a visible CUDA GPU, found none (CUDA_VISIBLE_DEVICES, driver?)");
  gpu::GpuEngineOptions opt;
  opt.model = model_options(o);
  gpu::GpuEngine::apply_recompute(o.recompute, model_cfg, &opt);
  check_dtype(o.dtype);
  return std::make_unique<GpuDeviceEngine>(model_cfg, table, o.adamw, opt);
}

}  // namespace longtune
