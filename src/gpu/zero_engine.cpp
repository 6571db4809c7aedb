#include "src/gpu/zero_engine.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "kernels/cpu/elementwise.hpp"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/cuda_check.cuh"
#include "src/common/error.hpp"

namespace longtune::gpu {

namespace {

// NCCL channels and buffers of the two communicators (fetch, gradients), allocated at their first
// collectives: measured peaks on H200 ran 0.47-0.50 GiB above a 384 MiB allowance at 2 and 4 ranks.
constexpr size_t kNcclAllowance = size_t(896) << 20;
constexpr int kWeightSlots = 3;  // streamed: this layer, the next (its input norm closes this one), a prefetch
constexpr int kGradSlots = 2;    // a layer's gradient is reduced while the next one's backward runs
// fetch_from_master: fp32 elements per host-to-device chunk before the conversion (64 MiB: large
// enough that the conversion kernel between copies costs under 1% of the copy time); bf16 host
// gradients go down in chunks of as many elements.
constexpr int64_t kFetchChunk = int64_t(16) << 20;

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Sizes shared by plan() and the constructor.
struct Sizes {
  int64_t total_len = 0, shard_len = 0, max_layer = 0, embed = 0, head = 0, max_piece = 0;
  int64_t max_block() const { return std::max({max_layer, embed, head}); }
  Sizes(const ParamTable& t, int world) {
    const ShardLayout layout(t.total_elements(), world);
    total_len = layout.total_len;
    shard_len = layout.shard_len;
    for (int b = 0; b < t.num_blocks(); ++b) {
      const int64_t n = t.block_end(b) - t.block_begin(b);
      if (b == ParamTable::kEmbedBlock) embed = n;
      else if (b == t.head_block()) head = n;
      else max_layer = std::max(max_layer, n);
      for (int64_t c : layout.counts(t.block_begin(b), t.block_end(b))) max_piece = std::max(max_piece, c);
    }
  }
};

// Untied models: the head's gradient is complete (and reduced) long before the embedding's backward
// starts, so both use one buffer. Tied ones: the lm_head gradient is the embedding's, open all along.
bool shared_end_grads(const ParamTable& t) { return !t.tied(); }

bool direct_grads(const ZeroEngineOptions& opt, int world) {
  // One rank, optimizer on the GPU: the model adds straight into the shard's accumulator.
  return world == 1 && opt.optimizer == OptimizerPlace::kDevice;
}

bool bf16_wire(const ZeroEngineOptions& opt, int world) { return world > 1 && opt.grad_wire_dtype == DType::BF16; }

}  // namespace

std::string ZeroMemoryPlan::describe() const {
  std::string s = "device: ";
  if (optimizer_state) s += "optimizer state " + format_bytes(double(optimizer_state)) + " + ";
  s += "weights " + format_bytes(double(weights)) + " + gradients " + format_bytes(double(grads)) +
       " + activations " + format_bytes(double(activations)) + " + libraries " + format_bytes(double(library)) +
       " = " + format_bytes(double(device_total())) + "; host: state " + format_bytes(double(host_state)) +
       " + pinned " + format_bytes(double(host_pinned)) + " = " + format_bytes(double(host_total()));
  return s;
}

ZeroMemoryPlan ZeroEngine::plan(const LlamaConfig& cfg, const ZeroEngineOptions& opt, int world) {
  const ParamTable table(cfg);
  const Sizes z(table, world);
  const size_t cb = 2;  // compute dtype bytes
  ZeroMemoryPlan p;
  if (opt.optimizer == OptimizerPlace::kDevice) {
    p.optimizer_state = 4 * align_up(size_t(z.shard_len) * 4);
    if (opt.weights == WeightPlace::kStreamed) p.optimizer_state += align_up(size_t(z.shard_len) * cb);
  }
  if (opt.weights == WeightPlace::kResident) {
    p.weights = align_up(size_t(z.total_len) * cb);
  } else {
    p.weights = kWeightSlots * align_up(size_t(z.max_layer) * cb) + align_up(size_t(z.embed) * cb) +
                align_up(size_t(z.head) * cb);
  }
  if (!direct_grads(opt, world)) {
    p.grads = kGradSlots * align_up(size_t(z.max_layer) * 4);
    if (shared_end_grads(table)) p.grads += align_up(size_t(std::max(z.embed, z.head)) * 4);
    else p.grads += align_up(size_t(z.embed) * 4) + align_up(size_t(z.head) * 4);
    if (world > 1 && opt.grad_wire_dtype == DType::BF16) p.grads += align_up(size_t(z.max_piece) * 4);
    // bf16 wire: the block converted for the reduce-scatter, and the reduced piece before widening.
    if (bf16_wire(opt, world)) p.grads += align_up(size_t(z.max_block()) * 2) + align_up(size_t(z.max_piece) * 2);
  }
  const bool host = opt.optimizer == OptimizerPlace::kHost;
  const DType host_grad = host ? opt.host_grad_dtype : DType::F32;
  if (host && host_grad == DType::BF16) p.grads += align_up(size_t(std::min(z.max_piece, kFetchChunk)) * 2);
  if (host && opt.fetch_from_master) p.weights += align_up(size_t(kFetchChunk) * 4);
  p.activations = LlamaGpu::activation_bytes(cfg, opt.model);
  p.library = LlamaGpu::library_bytes(opt.model) + (world > 1 ? kNcclAllowance : 0);
  p.host_state = ShardedTrainState::arena_bytes(z.shard_len, host_grad);
  if (host) {
    if (!opt.fetch_from_master) p.host_pinned += round_up_to_pages(size_t(z.shard_len) * cb);
    p.host_pinned += round_up_to_pages(size_t(z.max_piece) * 4);  // staging of later micro-batches
    if (opt.delayed_update) p.host_pinned += round_up_to_pages(size_t(z.shard_len) * dtype_size(host_grad));
  }
  p.host_pinned += round_up_to_pages(LlamaGpu::host_activation_bytes(cfg, opt.model));
  return p;
}

void ZeroEngine::apply_placement(ZeroEngineOptions* opt, const std::string& offload, const std::string& weights,
                                 const std::string& recompute, const LlamaConfig& cfg, int world, size_t device_free) {
  if (offload != "none" && offload != "optimizer" && offload != "params")
    throw ConfigError("--offload: expected none, optimizer or params, got '" + offload + "'");
  if (weights != "resident" && weights != "streamed")
    throw ConfigError("--weights: expected resident or streamed, got '" + weights + "'");
  opt->optimizer = offload == "none" ? OptimizerPlace::kDevice : OptimizerPlace::kHost;
  opt->weights = (offload == "params" || weights == "streamed") ? WeightPlace::kStreamed : WeightPlace::kResident;
  apply_recompute_option(recompute, opt, device_free,
                         [&](const ZeroEngineOptions& o) { return plan(cfg, o, world).device_total(); });
}

void check_host_memory(const ZeroMemoryPlan& plan, Comm& comm) {
  const int64_t available = host_memory_available();
  const double need = double(plan.host_total()) * comm.local_size();
  // Every rank decides on the largest shortfall of any node, so all of them refuse together.
  double short_by[1] = {available < 0 ? 0.0 : need - double(available)};
  comm.all_reduce_max(short_by, 1);
  if (short_by[0] <= 0) return;
  throw ConfigError("host memory: this run needs " + format_bytes(double(plan.host_total())) + " per rank (" +
                    plan.describe() + ") x " + std::to_string(comm.local_size()) + " rank(s) on this node = " +
                    format_bytes(need) + ", the node has " + format_bytes(double(std::max<int64_t>(available, 0))) +
                    " available (--host-grad-dtype bf16 --host-weights master, more nodes, or `longtune plan`)");
}

void ZeroEngine::apply_host_state(ZeroEngineOptions* opt, const std::string& host_grad_dtype,
                                  const std::string& host_weights) {
  if (host_grad_dtype != "fp32" && host_grad_dtype != "bf16")
    throw ConfigError("--host-grad-dtype: expected fp32 or bf16, got '" + host_grad_dtype + "'");
  if (host_weights != "copy" && host_weights != "master")
    throw ConfigError("--host-weights: expected copy or master, got '" + host_weights + "'");
  const bool lean = host_grad_dtype != "fp32" || host_weights != "copy";
  if (lean && opt->optimizer != OptimizerPlace::kHost)
    throw ConfigError("--host-grad-dtype " + host_grad_dtype + " --host-weights " + host_weights +
                      ": expected --offload optimizer or params (they shape the host optimizer state)");
  opt->host_grad_dtype = host_grad_dtype == "bf16" ? DType::BF16 : DType::F32;
  opt->fetch_from_master = host_weights == "master";
}

DType ZeroEngine::grad_wire_dtype_from_name(const std::string& name) {
  if (name == "fp32") return DType::F32;
  if (name == "bf16") return DType::BF16;
  throw ConfigError("--grad-reduce-dtype: expected fp32 or bf16, got '" + name + "'");
}

struct ZeroEngine::Block {
  int64_t begin = 0, end = 0;   // flat range
  std::vector<int64_t> counts;  // per rank
  int64_t piece_offset = 0;     // this rank's piece, within the block
  int64_t piece_len = 0;
  int64_t shard_offset = 0;     // the piece, within this rank's shard
  bool streamed = false;        // weights through the slots
  uint16_t* weights = nullptr;  // device, not streamed: where the block's weights live
  int64_t fetched_version = -1; // version of the weights on the device (resident) 
  float* grad = nullptr;        // device fp32 gradient buffer (dedicated or a slot)
  int grad_slot = -1;
  std::unique_ptr<AdamW> adamw; // kHost: the rules for this piece
  // kHost: the weights version this block's host state holds (behind Access::version while its
  // update is pending).
  int64_t host_version = 0;
  int64_t len() const { return end - begin; }
};

struct WeightSlot {
  uint16_t* data = nullptr;
  int block = -1;
  int64_t version = -1;
  int users = 0;
  cudaEvent_t released = nullptr;  // compute stream done with the last use
  cudaEvent_t ready = nullptr;     // fetch done
  uint64_t last_use = 0;
};

struct GradSlot {
  float* data = nullptr;
  cudaEvent_t consumed = nullptr;  // grad stream done reading it
};

class ZeroEngine::Access final : public GpuParamAccess {
 public:
  explicit Access(ZeroEngine& e) : e_(e) {}
  const void* acquire(int block) override;
  void release(int block) override;
  float* grads(int block) override;
  void grads_done(int block) override;
  void enqueued() override { e_.run_delayed_update(); }

  bool forward = true;       // prefetch direction
  int64_t version = 0;       // weights version (bumped by every update)
  std::vector<WeightSlot> wslots;
  std::vector<GradSlot> gslots;
  std::vector<cudaEvent_t> block_ready;  // resident blocks: fetch done
  std::vector<cudaEvent_t> grads_done_ev;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> comm_ev;  // per block: around its reduce-scatter
  std::vector<int> comm_timed;                               // per block: events recorded this step
  cudaEvent_t step_start = nullptr, step_end = nullptr;
  uint64_t use_counter = 0;
  std::vector<int> slot_of;  // per block, -1 if not in a slot
  std::vector<int> grad_touched;  // per block: zeroed this micro-batch
  float* piece = nullptr;         // bf16 wire: the reduced piece widened to fp32 (fp32 reduces in place)
  uint16_t* wire = nullptr;       // bf16 wire: the block's gradient in bf16 (the largest block)
  uint16_t* wire_piece = nullptr; // bf16 wire: this rank's reduced piece, before widening to fp32
  float* host_staging = nullptr;  // kHost, later micro-batches: D2H target before the CPU adds
  std::unique_ptr<PinnedBuffer> host_staging_holder;

  int find_slot(int block) const {
    for (size_t s = 0; s < wslots.size(); ++s)
      if (wslots[s].block == block && wslots[s].version == version) return int(s);
    return -1;
  }
  int fetch_into_slot(int block);
  void prefetch(int block);
  void release_grad_slot(const ZeroEngine::Block& b);

 private:
  ZeroEngine& e_;
};

// ---- weights ------------------------------------------------------------------------------------

// Own piece into place, then the owners' pieces gathered, on the fetch stream. The callers run the
// block's pending CPU update first (kHost).
void ZeroEngine::gather_block(Block& b, uint16_t* dest) {
  uint16_t* mine = dest + b.piece_offset;
  if (b.piece_len > 0) {
    if (host_compute_) {
      const auto* hc = static_cast<const uint16_t*>(host_compute_->get());
      CUDA_CHECK(cudaMemcpyAsync(mine, hc + b.shard_offset, size_t(b.piece_len) * 2, cudaMemcpyHostToDevice,
                                 fetch_stream_));
    } else if (opt_.optimizer == OptimizerPlace::kHost) {
      // fetch_from_master: fp32 chunks through the staging buffer, converted as the CPU would.
      const float* master = state_.master() + b.shard_offset;
      for (int64_t off = 0; off < b.piece_len; off += kFetchChunk) {
        const int64_t n = std::min(kFetchChunk, b.piece_len - off);
        CUDA_CHECK(cudaMemcpyAsync(d_fetch_staging_, master + off, size_t(n) * 4, cudaMemcpyHostToDevice,
                                   fetch_stream_));
        cuda::convert_f32(mine + off, opt_.model.compute_dtype, d_fetch_staging_, n, fetch_stream_);
      }
    } else if (d_compute_shard_ && mine != d_compute_shard_ + b.shard_offset) {
      // kDevice + resident: the update wrote this rank's piece in place already (no copy then).
      CUDA_CHECK(cudaMemcpyAsync(mine, d_compute_shard_ + b.shard_offset, size_t(b.piece_len) * 2,
                                 cudaMemcpyDeviceToDevice, fetch_stream_));
    }
  }
  if (fetch_comm_ && fetch_comm_->size() > 1) fetch_comm_->all_gather_v(dest, mine, b.counts, DType::BF16, fetch_stream_);
}

void ZeroEngine::fetch(int bi) {
  // Resident block: refresh after an update.
  Block& b = blocks_[size_t(bi)];
  if (b.fetched_version == access_->version) return;
  const auto t0 = Clock::now();
  if (opt_.optimizer == OptimizerPlace::kHost) run_host_update(bi);
  timeline_.wait_weights += seconds_since(t0);
  gather_block(b, b.weights);
  CUDA_CHECK(cudaEventRecord(access_->block_ready[size_t(bi)], fetch_stream_));
  b.fetched_version = access_->version;
}

int ZeroEngine::Access::fetch_into_slot(int block) {
  // Least recently used slot nobody holds.
  int best = -1;
  for (size_t s = 0; s < wslots.size(); ++s) {
    if (wslots[s].users > 0) continue;
    if (best < 0 || wslots[s].last_use < wslots[size_t(best)].last_use) best = int(s);
  }
  LT_CHECK(best >= 0, "ZeroEngine: every weight slot is in use");
  WeightSlot& ws = wslots[size_t(best)];
  if (ws.block >= 0 && slot_of[size_t(ws.block)] == best) slot_of[size_t(ws.block)] = -1;
  ZeroEngine::Block& b = e_.blocks_[size_t(block)];
  const auto t0 = Clock::now();
  if (e_.opt_.optimizer == OptimizerPlace::kHost) e_.run_host_update(block);
  e_.timeline_.wait_weights += seconds_since(t0);
  CUDA_CHECK(cudaStreamWaitEvent(e_.fetch_stream_, ws.released, 0));  // the last user is done with it
  e_.gather_block(b, ws.data);
  CUDA_CHECK(cudaEventRecord(ws.ready, e_.fetch_stream_));
  ws.block = block;
  ws.version = version;
  ws.last_use = ++use_counter;
  slot_of[size_t(block)] = best;
  return best;
}

void ZeroEngine::Access::prefetch(int block) {
  if (block < 1 || block >= e_.table_.head_block()) return;  // layer blocks only
  if (find_slot(block) >= 0) return;
  for (const WeightSlot& ws : wslots)
    if (ws.users == 0) {
      fetch_into_slot(block);
      return;
    }
}

const void* ZeroEngine::Access::acquire(int block) {
  ZeroEngine::Block& b = e_.blocks_[size_t(block)];
  if (!b.streamed) {
    e_.fetch(block);
    CUDA_CHECK(cudaStreamWaitEvent(e_.compute_, block_ready[size_t(block)], 0));
    return block_base(b.weights, b.begin, 2);
  }
  int s = find_slot(block);
  if (s < 0) s = fetch_into_slot(block);
  WeightSlot& ws = wslots[size_t(s)];
  ++ws.users;
  ws.last_use = ++use_counter;
  CUDA_CHECK(cudaStreamWaitEvent(e_.compute_, ws.ready, 0));
  prefetch(forward ? block + 1 : block - 1);
  return block_base(ws.data, b.begin, 2);
}

void ZeroEngine::Access::release(int block) {
  ZeroEngine::Block& b = e_.blocks_[size_t(block)];
  if (!b.streamed) return;
  const int s = find_slot(block);
  LT_CHECK(s >= 0 && wslots[size_t(s)].users > 0, "ZeroEngine: release of a block that is not acquired");
  WeightSlot& ws = wslots[size_t(s)];
  CUDA_CHECK(cudaEventRecord(ws.released, e_.compute_));
  --ws.users;
}

// ---- gradients ----------------------------------------------------------------------------------

float* ZeroEngine::Access::grads(int block) {
  ZeroEngine& e = e_;
  forward = false;  // backward has begun: prefetch downwards
  ZeroEngine::Block& b = e.blocks_[size_t(block)];
  if (direct_grads(e.opt_, e.world_)) return e.d_grad_;  // shard == the whole flat space
  if (!grad_touched[size_t(block)]) {
    grad_touched[size_t(block)] = 1;
    if (b.grad_slot >= 0) {
      GradSlot& gs = gslots[size_t(b.grad_slot)];
      b.grad = gs.data;
      CUDA_CHECK(cudaStreamWaitEvent(e.compute_, gs.consumed, 0));
    }
    CUDA_CHECK(cudaMemsetAsync(b.grad, 0, size_t(b.len()) * 4, e.compute_));
  }
  return const_cast<float*>(static_cast<const float*>(block_base(b.grad, b.begin, 4)));
}

void ZeroEngine::Access::grads_done(int block) {
  ZeroEngine& e = e_;
  if (direct_grads(e.opt_, e.world_)) return;
  ZeroEngine::Block& b = e.blocks_[size_t(block)];
  if (!grad_touched[size_t(block)]) grads(block);  // no gradient reached it: zeros (still collective)
  grad_touched[size_t(block)] = 0;
  cudaStream_t gs = e.grad_stream_;
  CUDA_CHECK(cudaEventRecord(grads_done_ev[size_t(block)], e.compute_));
  CUDA_CHECK(cudaStreamWaitEvent(gs, grads_done_ev[size_t(block)], 0));
  const bool first = e.micro_index_ == 0;
  const bool bf16 = bf16_wire(e.opt_, e.world_);
  // This rank's reduced piece, on the device.
  const float* piece_dev = b.grad;  // one rank: the whole block is the piece
  if (e.world_ > 1) {
    // fp32 on the wire: reduced in place (NCCL's in-place form: this rank's piece of the block), so
    // no piece buffer as large as the largest piece (the 8B embedding: 2.1 GB) is needed.
    float* out = bf16 ? piece : b.grad + b.piece_offset;
    if (e.opt_.optimizer == OptimizerPlace::kDevice && first) out = e.d_grad_ + b.shard_offset;
    if (bf16) {
      // Half the bytes on the wire; NCCL sums in bf16, the piece is widened back into the fp32 path.
      cuda::convert_f32(wire, DType::BF16, b.grad, b.len(), gs);
      release_grad_slot(b);  // the rest reads the bf16 copy: the next backward may refill the slot meanwhile
      CUDA_CHECK(cudaEventRecord(comm_ev[size_t(block)].first, gs));
      e.grad_comm_->reduce_scatter_v(wire_piece, wire, b.counts, DType::BF16, gs);
      CUDA_CHECK(cudaEventRecord(comm_ev[size_t(block)].second, gs));
      cuda::convert_to_f32(out, wire_piece, DType::BF16, b.piece_len, gs);
    } else {
      CUDA_CHECK(cudaEventRecord(comm_ev[size_t(block)].first, gs));
      e.grad_comm_->reduce_scatter_v(out, b.grad, b.counts, DType::F32, gs);
      CUDA_CHECK(cudaEventRecord(comm_ev[size_t(block)].second, gs));
    }
    comm_timed[size_t(block)] = 1;
    piece_dev = out;
  }
  if (b.piece_len > 0) {
    if (e.opt_.optimizer == OptimizerPlace::kDevice) {
      if (!(e.world_ > 1 && first)) {
        if (first) CUDA_CHECK(cudaMemcpyAsync(e.d_grad_ + b.shard_offset, piece_dev, size_t(b.piece_len) * 4,
                                              cudaMemcpyDeviceToDevice, gs));
        else cuda::accumulate_f32(e.d_grad_ + b.shard_offset, piece_dev, b.piece_len, gs);
      }
    } else if (first && e.opt_.host_grad_dtype == DType::BF16) {
      // In chunks through one small buffer: stream order keeps each conversion behind the last copy.
      auto* host = static_cast<uint16_t*>(e.host_grad()) + b.shard_offset;
      for (int64_t off = 0; off < b.piece_len; off += kFetchChunk) {
        const int64_t n = std::min(kFetchChunk, b.piece_len - off);
        cuda::convert_f32(e.d_piece_bf16_, DType::BF16, piece_dev + off, n, gs);
        CUDA_CHECK(cudaMemcpyAsync(host + off, e.d_piece_bf16_, size_t(n) * 2, cudaMemcpyDeviceToHost, gs));
      }
    } else if (first) {
      CUDA_CHECK(cudaMemcpyAsync(static_cast<float*>(e.host_grad()) + b.shard_offset, piece_dev,
                                 size_t(b.piece_len) * 4, cudaMemcpyDeviceToHost, gs));
    } else {
      // Later micro-batches: through the staging buffer, added on the CPU once the copy is done (the
      // previous block's addition is finished first: it used the same buffer).
      {
        const auto t0 = Clock::now();
        e.run_deferred();
        e.timeline_.wait_grads += seconds_since(t0);
      }
      CUDA_CHECK(cudaMemcpyAsync(host_staging, piece_dev, size_t(b.piece_len) * 4, cudaMemcpyDeviceToHost, gs));
      cudaEvent_t copied = grads_done_ev[size_t(block)];  // reuse: recorded again below on gs
      CUDA_CHECK(cudaEventRecord(copied, gs));
      const int64_t n = b.piece_len, o = b.shard_offset;
      float* src = host_staging;
      if (e.opt_.host_grad_dtype == DType::BF16) {
        uint16_t* acc = static_cast<uint16_t*>(e.host_grad()) + o;
        e.defer([copied, acc, src, n] {
          CUDA_CHECK(cudaEventSynchronize(copied));
          cpu::accumulate_bf16(acc, src, n);
        });
      } else {
        float* acc = static_cast<float*>(e.host_grad()) + o;
        e.defer([copied, acc, src, n] {
          CUDA_CHECK(cudaEventSynchronize(copied));
          cpu::accumulate_f32(acc, src, n);
        });
      }
    }
  }
  if (!bf16) release_grad_slot(b);
}

void ZeroEngine::Access::release_grad_slot(const ZeroEngine::Block& b) {
  // The grad stream's last read of b.grad is enqueued: the compute stream may zero the slot after it.
  if (b.grad_slot >= 0) CUDA_CHECK(cudaEventRecord(gslots[size_t(b.grad_slot)].consumed, e_.grad_stream_));
}

// ---- engine -------------------------------------------------------------------------------------

ZeroEngine::ZeroEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw,
                       const ZeroEngineOptions& opt, ShardedTrainState& state)
    : table_(table),
      adamw_cfg_(adamw),
      opt_(opt),
      state_(state),
      scaler_(opt.model.compute_dtype, opt.initial_loss_scale, opt.loss_scale_window) {
  world_ = state.comm().size();
  rank_ = state.comm().rank();
  if (opt.delayed_update && (opt.optimizer != OptimizerPlace::kHost || opt.weights != WeightPlace::kResident))
    throw ConfigError("--delayed-update: expected --offload optimizer with resident weights (it overlaps the CPU "
                      "update with the next step; streamed weights would read the host copy while it is rewritten)");
  if (opt.host_grad_dtype != DType::F32 && opt.host_grad_dtype != DType::BF16)
    throw ConfigError("--host-grad-dtype: expected fp32 or bf16, got " + std::string(dtype_name(opt.host_grad_dtype)));
  if (opt.optimizer != OptimizerPlace::kHost && (opt.host_grad_dtype != DType::F32 || opt.fetch_from_master))
    throw ConfigError("--host-grad-dtype bf16 / --host-weights master: expected --offload optimizer or params (they "
                      "shape the host copy of the optimizer state)");
  if (opt.optimizer == OptimizerPlace::kHost && state.grad_dtype() != opt.host_grad_dtype)
    throw InternalError("ZeroEngine: the state's gradient dtype differs from host_grad_dtype");
  if (opt.grad_wire_dtype != DType::F32 && opt.grad_wire_dtype != DType::BF16)
    throw ConfigError("--grad-reduce-dtype: expected fp32 or bf16, got " +
                      std::string(dtype_name(opt.grad_wire_dtype)));
  plan_ = plan(cfg, opt, world_);
  baseline_used_ = check_device_memory(plan_.device_total(), plan_.describe(),
                                       "shorter --seq-len, --recompute layer, --offload-activations true, "
                                       "--mlp-chunk 4096, --offload optimizer, --weights streamed; longtune plan");
  const Sizes z(table, world_);
  LT_CHECK(z.shard_len == state.shard_len(), "ZeroEngine: the state's shard does not match the layout");

  if (world_ > 1) {
    fetch_comm_ = make_device_comm(state.comm());
    grad_comm_ = make_device_comm(state.comm());
  }
  CUDA_CHECK(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamCreateWithFlags(&fetch_stream_, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamCreateWithFlags(&grad_stream_, cudaStreamNonBlocking));

  // ---- device memory: one arena for everything but the activations ----
  const std::vector<OptimRange> all_ranges = optim_ranges(table);
  const int64_t sb = state.shard_begin(), se = sb + z.shard_len;
  const std::vector<OptimRange> my_ranges = shard_ranges(all_ranges, sb, se);
  num_ranges_ = int64_t(my_ranges.size());
  const size_t ranges_bytes = align_up(std::max<size_t>(my_ranges.size(), 1) * sizeof(cuda::DeviceOptimRange));
  const size_t scratch_bytes = align_up(cuda::adamw_reduce_scratch_bytes(z.shard_len));
  arena_.allocate(plan_.optimizer_state + plan_.weights + plan_.grads + ranges_bytes + scratch_bytes + 4 * kDeviceAlign,
                  "sharded GPU engine");
  if (opt.optimizer == OptimizerPlace::kDevice) {
    d_master_ = arena_.take_n<float>(z.shard_len);
    d_exp_avg_ = arena_.take_n<float>(z.shard_len);
    d_exp_avg_sq_ = arena_.take_n<float>(z.shard_len);
    d_grad_ = arena_.take_n<float>(z.shard_len);
    CUDA_CHECK(cudaMemsetAsync(d_grad_, 0, size_t(z.shard_len) * 4, compute_));
    if (opt.weights == WeightPlace::kStreamed) d_compute_shard_ = arena_.take_n<uint16_t>(z.shard_len);
  }
  uint16_t* full = nullptr;
  if (opt.weights == WeightPlace::kResident) {
    full = arena_.take_n<uint16_t>(z.total_len);
    CUDA_CHECK(cudaMemsetAsync(full, 0, size_t(z.total_len) * 2, compute_));  // padding defined
    if (opt.optimizer == OptimizerPlace::kDevice) d_compute_shard_ = full + sb;  // the update writes in place
  }
  access_ = std::make_unique<Access>(*this);
  Access& A = *access_;
  blocks_ = std::vector<Block>(size_t(table.num_blocks()));
  A.slot_of.assign(blocks_.size(), -1);
  A.grad_touched.assign(blocks_.size(), 0);
  A.block_ready.resize(blocks_.size());
  A.grads_done_ev.resize(blocks_.size());
  A.comm_ev.resize(blocks_.size());
  A.comm_timed.assign(blocks_.size(), 0);
  for (auto& [e0, e1] : A.comm_ev) {
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
  }
  for (size_t i = 0; i < blocks_.size(); ++i) {
    CUDA_CHECK(cudaEventCreateWithFlags(&A.block_ready[i], cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&A.grads_done_ev[i], cudaEventDisableTiming));
  }
  CUDA_CHECK(cudaEventCreate(&A.step_start));
  CUDA_CHECK(cudaEventCreate(&A.step_end));
  if (opt.weights == WeightPlace::kStreamed) {
    A.wslots.resize(kWeightSlots);
    for (WeightSlot& ws : A.wslots) {
      ws.data = arena_.take_n<uint16_t>(z.max_layer);
      CUDA_CHECK(cudaEventCreateWithFlags(&ws.released, cudaEventDisableTiming));
      CUDA_CHECK(cudaEventCreateWithFlags(&ws.ready, cudaEventDisableTiming));
      CUDA_CHECK(cudaEventRecord(ws.released, compute_));
    }
  }
  const bool direct = direct_grads(opt, world_);
  const bool shared_end = shared_end_grads(table);
  if (!direct) {
    // Slots 0..kGradSlots-1 take the layers; one more, sized for the larger, the head and embedding.
    A.gslots.resize(kGradSlots + (shared_end ? 1 : 0));
    for (size_t i = 0; i < A.gslots.size(); ++i) {
      GradSlot& gs = A.gslots[i];
      gs.data = arena_.take_n<float>(i < kGradSlots ? z.max_layer : std::max(z.embed, z.head));
      CUDA_CHECK(cudaEventCreateWithFlags(&gs.consumed, cudaEventDisableTiming));
      CUDA_CHECK(cudaEventRecord(gs.consumed, grad_stream_));
    }
    if (world_ > 1 && opt.grad_wire_dtype == DType::BF16) A.piece = arena_.take_n<float>(z.max_piece);
    if (bf16_wire(opt, world_)) {
      A.wire = arena_.take_n<uint16_t>(z.max_block());
      A.wire_piece = arena_.take_n<uint16_t>(z.max_piece);
    }
  }
  if (opt.optimizer == OptimizerPlace::kHost && opt.host_grad_dtype == DType::BF16)
    d_piece_bf16_ = arena_.take_n<uint16_t>(std::clamp<int64_t>(z.max_piece, 1, kFetchChunk));
  if (opt.optimizer == OptimizerPlace::kHost && opt.fetch_from_master) d_fetch_staging_ = arena_.take_n<float>(kFetchChunk);
  for (int bi = 0; bi < table.num_blocks(); ++bi) {
    Block& b = blocks_[size_t(bi)];
    b.begin = table.block_begin(bi);
    b.end = table.block_end(bi);
    b.counts = state.layout().counts(b.begin, b.end);
    for (int r = 0; r < rank_; ++r) b.piece_offset += b.counts[size_t(r)];
    b.piece_len = b.counts[size_t(rank_)];
    b.shard_offset = std::max(b.begin, sb) - sb;
    if (b.piece_len == 0) b.shard_offset = 0;
    const bool layer = bi != ParamTable::kEmbedBlock && bi != table.head_block();
    b.streamed = opt.weights == WeightPlace::kStreamed && layer;
    if (!b.streamed) b.weights = full ? full + b.begin : arena_.take_n<uint16_t>(b.len());
    if (!direct) {
      if (layer) b.grad_slot = bi % kGradSlots;
      else if (shared_end) b.grad_slot = kGradSlots;
      else b.grad = arena_.take_n<float>(b.len());
    }
    if (opt.optimizer == OptimizerPlace::kHost && b.piece_len > 0)
      b.adamw = std::make_unique<AdamW>(shard_ranges(all_ranges, b.begin + b.piece_offset,
                                                     b.begin + b.piece_offset + b.piece_len),
                                        b.piece_len, adamw);
  }
  d_ranges_ = arena_.take(ranges_bytes);
  reduce_scratch_ = arena_.take(scratch_bytes);
  d_norm_sq_ = arena_.take_n<double>(1);
  d_nonfinite_ = arena_.take_n<int32_t>(1);
  std::vector<cuda::DeviceOptimRange> dev_ranges;
  for (const OptimRange& r : my_ranges) dev_ranges.push_back({r.offset, r.numel, r.decay ? 1 : 0});
  if (!dev_ranges.empty())
    CUDA_CHECK(cudaMemcpy(d_ranges_, dev_ranges.data(), dev_ranges.size() * sizeof(cuda::DeviceOptimRange),
                          cudaMemcpyHostToDevice));
  host_flags_ = std::make_unique<PinnedBuffer>(sizeof(double) + sizeof(int32_t));
  rules_ = std::make_unique<AdamW>(my_ranges, z.shard_len, adamw);

  if (opt.optimizer == OptimizerPlace::kHost) {
    // The gradient accumulator receives the device-to-host copies (and with fetch_from_master the
    // master feeds the host-to-device ones): page-lock them in place.
    const size_t grad_bytes = dtype_size(opt.host_grad_dtype);
    void* grad = opt.host_grad_dtype == DType::BF16 ? static_cast<void*>(state.grad_shard_bf16())
                                                     : static_cast<void*>(state.grad_shard());
    const auto lock = [this](void* p, size_t bytes) {
      if (bytes == 0) return;
      CUDA_CHECK(cudaHostRegister(p, bytes, cudaHostRegisterDefault));
      registered_.push_back(p);
    };
    lock(grad, size_t(z.shard_len) * grad_bytes);
    if (opt.fetch_from_master) lock(state.master(), size_t(z.shard_len) * 4);
    else host_compute_ = std::make_unique<PinnedBuffer>(size_t(z.shard_len) * 2);
    A.host_staging_holder = std::make_unique<PinnedBuffer>(size_t(std::max<int64_t>(z.max_piece, 1)) * 4);
    A.host_staging = static_cast<float*>(A.host_staging_holder->get());
    host_grad_[0] = grad;
    host_grad_[1] = host_grad_[0];
    if (opt.delayed_update) {
      // Step t + 1's gradients arrive while step t's update still reads its own.
      second_grad_ = std::make_unique<PinnedBuffer>(size_t(z.shard_len) * grad_bytes);
      host_grad_[1] = second_grad_->get();
    }
  }

  act_arena_.allocate(plan_.activations, "GPU activations");
  model_ = std::make_unique<LlamaGpu>(cfg, table, opt.model, act_arena_, compute_);
  state_changed();
}

ZeroEngine::~ZeroEngine() {
  if (compute_) cudaStreamSynchronize(compute_);
  if (fetch_stream_) cudaStreamSynchronize(fetch_stream_);
  if (grad_stream_) cudaStreamSynchronize(grad_stream_);
  model_.reset();
  for (void* p : registered_) cudaHostUnregister(p);
  if (access_) {
    for (cudaEvent_t e : access_->block_ready) cudaEventDestroy(e);
    for (cudaEvent_t e : access_->grads_done_ev) cudaEventDestroy(e);
    for (WeightSlot& ws : access_->wslots) cudaEventDestroy(ws.released), cudaEventDestroy(ws.ready);
    for (GradSlot& gs : access_->gslots) cudaEventDestroy(gs.consumed);
    for (auto& [e0, e1] : access_->comm_ev) cudaEventDestroy(e0), cudaEventDestroy(e1);
    cudaEventDestroy(access_->step_start);
    cudaEventDestroy(access_->step_end);
  }
  fetch_comm_.reset();
  grad_comm_.reset();
  for (cudaStream_t s : {compute_, fetch_stream_, grad_stream_})
    if (s) cudaStreamDestroy(s);
}

// ---- host work on the calling thread ------------------------------------------------------------
// Kokkos (3.4, OpenMP) runs parallel loops only from the thread that initialized it, so host work
// is done here, lazily: a block's AdamW update runs when the next forward first needs the block,
// while the GPU still works through the layers already enqueued before it.

void ZeroEngine::defer(std::function<void()> task) { deferred_.push_back(std::move(task)); }

void ZeroEngine::run_deferred() {
  while (!deferred_.empty()) {
    std::function<void()> task = std::move(deferred_.front());
    deferred_.pop_front();
    task();
  }
}

void ZeroEngine::apply_host_update(int bi) {
  Block& b = blocks_[size_t(bi)];
  const auto t0 = Clock::now();
  if (b.adamw) {
    const int64_t o = b.shard_offset;
    AdamWBuffers buf{state_.master() + o, state_.exp_avg() + o, state_.exp_avg_sq() + o, nullptr, nullptr,
                     opt_.model.compute_dtype};
    set_grad(&buf, pending_.grad, o);
    if (host_compute_) buf.compute = static_cast<uint16_t*>(host_compute_->get()) + o;
    b.adamw->update(buf, pending_.step, pending_.lr, pending_.grad_coef);
  }
  timeline_.cpu_optimizer += seconds_since(t0);
}

void ZeroEngine::set_grad(AdamWBuffers* b, const void* grad, int64_t offset) const {
  if (opt_.host_grad_dtype == DType::BF16) b->grad_bf16 = static_cast<const uint16_t*>(grad) + offset;
  else b->grad = static_cast<const float*>(grad) + offset;
}

void ZeroEngine::run_host_update(int bi) {
  Block& b = blocks_[size_t(bi)];
  if (b.host_version >= access_->version) return;
  apply_host_update(bi);
  b.host_version = access_->version;
}

void ZeroEngine::finish_host_updates() {
  if (opt_.optimizer != OptimizerPlace::kHost) return;
  run_delayed_update();
  for (int bi = 0; bi < int(blocks_.size()); ++bi) run_host_update(bi);
}

void ZeroEngine::run_delayed_update() {
  if (!delayed_pending_) return;
  delayed_pending_ = false;
  for (int bi = 0; bi < int(blocks_.size()); ++bi) {
    // A fetch of this block's previous weights may still be reading the host copy.
    if (!blocks_[size_t(bi)].streamed) CUDA_CHECK(cudaEventSynchronize(access_->block_ready[size_t(bi)]));
    apply_host_update(bi);
  }
  // The next forward fetches the new weights.
  ++access_->version;
  for (Block& b : blocks_) b.host_version = access_->version;
}

// ---- state --------------------------------------------------------------------------------------

void ZeroEngine::state_changed() {
  run_deferred();
  finish_host_updates();
  CUDA_CHECK(cudaDeviceSynchronize());
  const int64_t n = state_.shard_len();
  ++access_->version;
  if (opt_.optimizer == OptimizerPlace::kHost) {
    if (host_compute_) convert_from_f32(host_compute_->get(), state_.master(), opt_.model.compute_dtype, size_t(n));
    for (Block& b : blocks_) b.host_version = access_->version;
  } else {
    const size_t bytes = size_t(n) * 4;
    CUDA_CHECK(cudaMemcpyAsync(d_master_, state_.master(), bytes, cudaMemcpyHostToDevice, compute_));
    CUDA_CHECK(cudaMemcpyAsync(d_exp_avg_, state_.exp_avg(), bytes, cudaMemcpyHostToDevice, compute_));
    CUDA_CHECK(cudaMemcpyAsync(d_exp_avg_sq_, state_.exp_avg_sq(), bytes, cudaMemcpyHostToDevice, compute_));
    CUDA_CHECK(cudaMemsetAsync(d_grad_, 0, bytes, compute_));
    cuda::convert_f32(d_compute_shard_, opt_.model.compute_dtype, d_master_, n, compute_);
    CUDA_CHECK(cudaStreamSynchronize(compute_));
  }
}

void ZeroEngine::sync_state() {
  run_deferred();
  finish_host_updates();
  if (opt_.optimizer == OptimizerPlace::kDevice) {
    const size_t bytes = size_t(state_.shard_len()) * 4;
    CUDA_CHECK(cudaMemcpyAsync(state_.master(), d_master_, bytes, cudaMemcpyDeviceToHost, compute_));
    CUDA_CHECK(cudaMemcpyAsync(state_.exp_avg(), d_exp_avg_, bytes, cudaMemcpyDeviceToHost, compute_));
    CUDA_CHECK(cudaMemcpyAsync(state_.exp_avg_sq(), d_exp_avg_sq_, bytes, cudaMemcpyDeviceToHost, compute_));
  }
  CUDA_CHECK(cudaDeviceSynchronize());
}

size_t ZeroEngine::peak_device_bytes() const {
  const DeviceMemoryInfo mem = device_memory_info();
  return mem.total - mem.free - baseline_used_;
}

// ---- steps --------------------------------------------------------------------------------------

LossSum ZeroEngine::evaluate(const PackedBatch& batch) {
  run_delayed_update();  // evaluate the weights a checkpoint would hold
  access_->forward = true;
  return model_->forward(*access_, batch);
}

GpuStepInfo ZeroEngine::train_step(const std::vector<PackedBatch>& micro_batches, int64_t global_targets,
                                   int64_t step, double lr, LossSum* loss_out, int64_t* tokens_out) {
  const auto t_step = Clock::now();
  timeline_ = ZeroTimeline{};
  GpuStepInfo info;
  info.loss_scale = scaler_.scale();
  info.optim.lr = lr;
  LossSum loss;
  Access& A = *access_;
  if (opt_.delayed_update) cur_grad_ ^= 1;  // the pending update keeps reading the other buffer
  std::fill(A.comm_timed.begin(), A.comm_timed.end(), 0);
  if (global_targets > 0) {
    const double scale = scaler_.scale() / double(global_targets);
    CUDA_CHECK(cudaEventRecord(A.step_start, compute_));
    for (size_t m = 0; m < micro_batches.size(); ++m) {
      micro_index_ = int(m);
      A.forward = true;
      loss += model_->forward_backward(A, micro_batches[m], scale);
    }
    CUDA_CHECK(cudaEventRecord(A.step_end, compute_));
  }
  // Global loss and token counts.
  double sums[3] = {loss.sum, double(loss.count), 0.0};
  if (global_targets > 0)
    for (const PackedBatch& b : micro_batches) sums[2] += double(b.num_tokens());
  state_.comm().all_reduce_sum(sums, 3);
  loss_out->sum = sums[0];
  loss_out->count = int64_t(sums[1]);
  if (tokens_out) *tokens_out = int64_t(sums[2]);
  if (global_targets == 0) {
    info.skipped = true;
    return info;
  }
  // Every gradient at its owner.
  {
    const auto t0 = Clock::now();
    CUDA_CHECK(cudaStreamSynchronize(grad_stream_));
    CUDA_CHECK(cudaStreamSynchronize(compute_));
    run_deferred();  // CPU additions of later micro-batches
    timeline_.wait_grads += seconds_since(t0);
  }
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, A.step_start, A.step_end));
  timeline_.gpu_compute = ms * 1e-3;
  for (size_t bi = 0; bi < blocks_.size(); ++bi)
    if (A.comm_timed[bi]) {
      CUDA_CHECK(cudaEventElapsedTime(&ms, A.comm_ev[bi].first, A.comm_ev[bi].second));
      timeline_.comm += ms * 1e-3;
      timeline_.comm_bytes += double(blocks_[bi].len()) * double(dtype_size(opt_.grad_wire_dtype));
    }

  bool nonfinite = false;
  double norm_sq = 0;
  finish_host_updates();  // a block the forward never fetched (none today) still gets its last update
  if (opt_.optimizer == OptimizerPlace::kHost) {
    norm_sq = opt_.host_grad_dtype == DType::BF16 ? rules_->grad_norm_sq(static_cast<const uint16_t*>(host_grad()))
                                                  : rules_->grad_norm_sq(static_cast<const float*>(host_grad()));
    state_.comm().all_reduce_sum(&norm_sq, 1);
    nonfinite = !std::isfinite(norm_sq);
  } else {
    norm_sq = grad_norm_sq_device(&nonfinite);
  }
  if (const std::optional<float> grad_coef = scaler_.decide(norm_sq, nonfinite, step, *rules_, &info)) {
    if (opt_.optimizer == OptimizerPlace::kHost) host_update(step, lr, *grad_coef);
    else device_update(step, lr, *grad_coef);
  } else if (direct_grads(opt_, world_)) {
    CUDA_CHECK(cudaMemsetAsync(d_grad_, 0, size_t(state_.shard_len()) * 4, compute_));  // skipped: start over
  }
  timeline_.step = seconds_since(t_step);
  return info;
}

double ZeroEngine::grad_norm_sq_device(bool* nonfinite) {
  cuda::grad_norm_sq(d_norm_sq_, d_nonfinite_, d_grad_, static_cast<const cuda::DeviceOptimRange*>(d_ranges_),
                     num_ranges_, state_.shard_len(), reduce_scratch_, compute_);
  auto* host = static_cast<char*>(host_flags_->get());
  CUDA_CHECK(cudaMemcpyAsync(host, d_norm_sq_, sizeof(double), cudaMemcpyDeviceToHost, compute_));
  CUDA_CHECK(cudaMemcpyAsync(host + sizeof(double), d_nonfinite_, sizeof(int32_t), cudaMemcpyDeviceToHost, compute_));
  CUDA_CHECK(cudaStreamSynchronize(compute_));
  double v[2] = {*reinterpret_cast<double*>(host), double(*reinterpret_cast<int32_t*>(host + sizeof(double)))};
  state_.comm().all_reduce_sum(v, 2);
  *nonfinite = v[1] != 0.0 || !std::isfinite(v[0]);
  return v[0];
}

void ZeroEngine::device_update(int64_t step, double lr, float grad_coef) {
  const cuda::AdamWScalars s = device_adamw_scalars(adamw_cfg_, step, lr, grad_coef);
  cuda::adamw_update(d_master_, d_exp_avg_, d_exp_avg_sq_, d_grad_, d_compute_shard_, opt_.model.compute_dtype,
                     static_cast<const cuda::DeviceOptimRange*>(d_ranges_), num_ranges_, s, compute_);
  if (direct_grads(opt_, world_)) CUDA_CHECK(cudaMemsetAsync(d_grad_, 0, size_t(state_.shard_len()) * 4, compute_));
  // The next fetches (on the fetch stream) read the new compute shard.
  CUDA_CHECK(cudaEventRecord(access_->step_end, compute_));
  CUDA_CHECK(cudaStreamWaitEvent(fetch_stream_, access_->step_end, 0));
  ++access_->version;
}

void ZeroEngine::host_update(int64_t step, double lr, float grad_coef) {
  pending_ = PendingUpdate{step, lr, grad_coef, host_grad()};
  if (opt_.delayed_update) {
    // Runs while the GPU computes the next step (Access::enqueued), which therefore still sees the
    // weights without this update.
    delayed_pending_ = true;
    return;
  }
  // Recorded only: each block's update runs when the next forward (or a sync) first needs it.
  ++access_->version;
}

}  // namespace longtune::gpu
