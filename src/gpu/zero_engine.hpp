// The sharded GPU engine: ZeRO across ranks (one GPU each, NCCL) and ZeRO-Offload to the host.
//
// The state is the trainer's ShardedTrainState: rank r owns shard r of the padded flat parameter
// space (fp32 master, exp_avg, exp_avg_sq, gradient accumulator). Where that state lives:
//   OptimizerPlace::kHost    in place, in the state's NUMA-bound host arena (the gradient
//                            accumulator page-locked in place with cudaHostRegister: no second
//                            copy); AdamW runs there, on the CPU (Kokkos), block by block when the
//                            next forward first needs the block, so the GPU computes the layers
//                            already enqueued while the CPU updates the next ones.
//   OptimizerPlace::kDevice  a device copy of the shard; AdamW runs on the GPU.
// The compute-dtype weights the kernels read:
//   WeightPlace::kResident   every GPU holds all of them (2 bytes per parameter);
//   WeightPlace::kStreamed   each block is fetched into one of a few device slots just before use and
//                            the next one is prefetched while this one computes (parameter offload
//                            with kHost, ZeRO-3 with kDevice).
// A block (ParamTable blocks: embedding, each decoder layer, head) spans the shards of one or a few
// ranks. Fetching a block = each owner copies its piece of the block's compute-dtype shard into
// place (host-to-device with kHost) and all_gather_v over the owners' pieces. As backward finishes a
// block, its gradient is reduce_scatter_v'd to the owners on a separate stream (fp32 or bf16 on the
// wire) and added to their shard accumulators (device) or copied to the host (kHost) while the
// backward of earlier blocks goes on.
//
// Delayed parameter update (ZeroEngineOptions::delayed_update; the ZeRO-Offload paper's DPU): the
// CPU update computed from step t's gradients runs while the GPU computes step t + 1, so step t + 1
// takes its gradients at the weights before that update (one step stale); the new weights are
// fetched at the start of step t + 2. Step 1 has nothing to overlap. A checkpoint, an evaluation or
// any sync_state() applies the pending update first, in both an uninterrupted and a resumed run, so
// resuming stays bit-exact. Needs --offload optimizer with resident weights.
//
// fp16 (V100): dynamic loss scaling exactly as GpuEngine does it. Steps with inf/nan gradients are
// skipped on every rank (the norm is all-reduced).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "src/gpu/device_comm.hpp"
#include "src/gpu/device_memory.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/llama_gpu.hpp"
#include "src/optim/adamw.hpp"
#include "src/train/sharded_state.hpp"

namespace longtune::gpu {

enum class OptimizerPlace { kDevice, kHost };
enum class WeightPlace { kResident, kStreamed };

struct ZeroEngineOptions {
  GpuModelOptions model;
  OptimizerPlace optimizer = OptimizerPlace::kHost;
  WeightPlace weights = WeightPlace::kResident;
  // Reduce-scatter dtype: F32, or BF16 (half the bytes; NCCL sums in bf16, so the rounding grows
  // with the rank count; accumulation stays fp32). World size 1: unused.
  DType grad_wire_dtype = DType::F32;
  bool delayed_update = false;         // kHost + kResident only: see the header comment
  // Lean host state (kHost), for models whose fp32 state nearly fills the host (8B on one GPU:
  // 16 B/param of fp32 state + 2 of compute copy = 144 GB > 128 GiB):
  //   host_grad_dtype BF16   the host gradient accumulator in bf16 (the state must be built with it):
  //                          half the gradient bytes over PCIe and in memory; AdamW widens them back
  //                          (exact), so the update is the fp32 one of bf16-rounded gradients.
  //   fetch_from_master      no compute-dtype copy of the shard on the host: fetches copy the fp32
  //                          master (page-locked in place) in chunks and convert it on the GPU --
  //                          bit-identical weights, twice the fetch bytes.
  DType host_grad_dtype = DType::F32;
  bool fetch_from_master = false;
  double initial_loss_scale = 65536.0;
  int64_t loss_scale_window = 2000;
};

// Memory of one rank, by part: what `plan` predicts and `train` refuses on.
struct ZeroMemoryPlan {
  // device
  size_t optimizer_state = 0;  // kDevice: fp32 master, exp_avg, exp_avg_sq, grad of the shard + compute shard
  size_t weights = 0;          // resident copy, or the streaming slots + the embedding/head blocks
  size_t grads = 0;            // block gradient buffers and reduce-scatter pieces
  size_t activations = 0;      // LlamaGpu::activation_bytes
  size_t library = 0;          // cuBLASLt, NCCL, CUDA context growth (allowance)
  // host (per rank)
  size_t host_state = 0;       // the ShardedTrainState arena (4 fp32 arrays of the shard)
  size_t host_pinned = 0;      // compute-dtype shard + staging (kHost), offloaded layer inputs (page-locked)
  size_t device_total() const { return optimizer_state + weights + grads + activations + library; }
  size_t host_total() const { return host_state + host_pinned; }
  std::string describe() const;
};

// Before the host state is allocated: ConfigError, on every rank of `comm` together, with the plan's
// numbers, when the plan's host memory per rank times the ranks on a node exceeds what that node
// has available (MemAvailable).
void check_host_memory(const ZeroMemoryPlan& plan, Comm& comm);

// Per-step timeline (seconds of the last train_step; metrics and bench).
struct ZeroTimeline {
  double step = 0;           // wall time of train_step
  double gpu_compute = 0;    // forward + backward on the compute stream (events)
  double cpu_optimizer = 0;  // host AdamW + compute-dtype copy (kHost) that ran during this step
                             // (the update of step t overlaps the forward of step t + 1)
  double wait_grads = 0;     // after backward: waiting for the last gradients to reach their owner
  double wait_weights = 0;   // host time in weight fetches, the pending CPU updates they run included
  double comm = 0;           // seconds inside the gradient reduce-scatters (grad stream, events)
  double comm_bytes = 0;     // their input bytes in the wire dtype (algbw = comm_bytes / comm)
};

class ZeroEngine {
 public:
  static ZeroMemoryPlan plan(const LlamaConfig& cfg, const ZeroEngineOptions& opt, int world);
  // The --offload (none | optimizer | params), --weights (resident | streamed) and --recompute
  // (none | layer | auto: none when the plan fits in 95% of `device_free` bytes, 0: the current
  // GPU's free memory) options of train and bench, into opt (ConfigError for other values). The
  // rest of opt must be set. Activation offload needs layer: auto turns it off when it picks none
  // and keeps what the user asked for with layer; none with it is a ConfigError.
  static void apply_placement(ZeroEngineOptions* opt, const std::string& offload, const std::string& weights,
                              const std::string& recompute, const LlamaConfig& cfg, int world,
                              size_t device_free = 0);

  // --host-grad-dtype (fp32 | bf16) and --host-weights (copy | master) into opt (ConfigError for
  // other values, or for non-default ones without host offload).
  static void apply_host_state(ZeroEngineOptions* opt, const std::string& host_grad_dtype,
                               const std::string& host_weights);
  // The --grad-reduce-dtype option (fp32 | bf16) of train and bench (ConfigError for other values).
  // Set it before apply_placement: the bf16 buffers count in the plan that --recompute auto reads.
  static DType grad_wire_dtype_from_name(const std::string& name);

  // state: this rank's shard (already holding the initial or resumed weights). Throws ConfigError
  // with the plan's numbers when the device memory does not suffice.
  ZeroEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw, const ZeroEngineOptions& opt,
             ShardedTrainState& state);
  ~ZeroEngine();
  ZeroEngine(const ZeroEngine&) = delete;
  ZeroEngine& operator=(const ZeroEngine&) = delete;

  // The state's arrays changed on the host (start, resume): refresh the device copies.
  void state_changed();
  // Everything the optimizer owes is done and, with kDevice, copied back into the state's arrays.
  void sync_state();

  // One optimizer step over this rank's micro-batches; collective. The loss is the global one, and
  // so are the packed tokens (0 when no rank had a counted target), when `tokens` is given.
  GpuStepInfo train_step(const std::vector<PackedBatch>& micro_batches, int64_t global_targets, int64_t step,
                         double lr, LossSum* loss, int64_t* tokens = nullptr);
  LossSum evaluate(const PackedBatch& batch);

  double loss_scale() const { return scaler_.scale(); }
  void set_loss_scale(double s) { scaler_.set_scale(s); }
  const ZeroMemoryPlan& memory_plan() const { return plan_; }
  const ZeroTimeline& timeline() const { return timeline_; }
  size_t peak_device_bytes() const;
  const ZeroEngineOptions& options() const { return opt_; }
  int world() const { return world_; }

  struct Block;  // per ParamTable block: range, this rank's piece, buffers, events (in the .cpp)
  class Access;  // the model's GpuParamAccess (in the .cpp)

 private:
  friend class Access;
  // Host work, on the calling thread (src/gpu/zero_engine.cpp says why).
  void defer(std::function<void()> task);
  void run_deferred();
  void apply_host_update(int block);
  void run_host_update(int block);
  void finish_host_updates();
  void run_delayed_update();
  void* host_grad() const { return host_grad_[cur_grad_]; }  // F32 or BF16 (opt_.host_grad_dtype)
  // AdamW's gradient fields for the host gradient buffer `grad` at element offset `offset`.
  void set_grad(AdamWBuffers* b, const void* grad, int64_t offset) const;

  void fetch(int block);  // a resident block's weights after an update
  // The block's weights into dest (the block's full range): this rank's piece from the host copy,
  // the host master or the device shard, then the owners' pieces gathered; on the fetch stream.
  void gather_block(Block& b, uint16_t* dest);
  void host_update(int64_t step, double lr, float grad_coef);
  void device_update(int64_t step, double lr, float grad_coef);
  double grad_norm_sq_device(bool* nonfinite);

  const ParamTable& table_;
  AdamWConfig adamw_cfg_;
  ZeroEngineOptions opt_;
  ShardedTrainState& state_;
  int world_ = 1, rank_ = 0;
  ZeroMemoryPlan plan_;
  std::unique_ptr<DeviceComm> fetch_comm_, grad_comm_;
  cudaStream_t compute_ = nullptr, fetch_stream_ = nullptr, grad_stream_ = nullptr;
  DeviceArena arena_, act_arena_;
  std::vector<Block> blocks_;
  std::unique_ptr<LlamaGpu> model_;
  std::unique_ptr<Access> access_;
  // Host side (kHost): the compute-dtype shard, page-locked.
  std::unique_ptr<PinnedBuffer> host_compute_;  // null with fetch_from_master
  std::vector<void*> registered_;               // host ranges page-locked in place
  float* d_fetch_staging_ = nullptr;            // fetch_from_master: fp32 chunk before conversion
  uint16_t* d_piece_bf16_ = nullptr;            // BF16 host gradients: the piece converted before D2H
  // Device side (kDevice): the shard's state.
  float *d_master_ = nullptr, *d_exp_avg_ = nullptr, *d_exp_avg_sq_ = nullptr, *d_grad_ = nullptr;
  uint16_t* d_compute_shard_ = nullptr;
  void* d_ranges_ = nullptr;
  int64_t num_ranges_ = 0;
  void* reduce_scratch_ = nullptr;
  double* d_norm_sq_ = nullptr;
  int32_t* d_nonfinite_ = nullptr;
  std::unique_ptr<PinnedBuffer> host_flags_;
  std::unique_ptr<AdamW> rules_;  // clip coefficient, and the norm over the whole shard (kHost)
  LossScaler scaler_;
  int micro_index_ = 0;  // within the current step
  size_t baseline_used_ = 0;
  ZeroTimeline timeline_;

  std::deque<std::function<void()>> deferred_;
  struct PendingUpdate {
    int64_t step = 0;
    double lr = 0;
    float grad_coef = 1;
    const void* grad = nullptr;  // the host gradient buffer it reads
  } pending_;
  bool delayed_pending_ = false;
  void* host_grad_[2] = {nullptr, nullptr};  // the state's accumulator, and a second one (delayed update)
  int cur_grad_ = 0;
  std::unique_ptr<PinnedBuffer> second_grad_;
};

}  // namespace longtune::gpu
