// ZeRO-3 style sharded training state. The flat parameter space (ParamTable layout) is padded to a
// multiple of the world size and split into equal contiguous shards; rank r owns fp32 master
// weights, AdamW moments and the fp32 gradient accumulator of shard r only, in one NUMA-placed
// host allocation (1/N of the single-process state).
//
// As the model's ParamAccess, a block's weights are all-gathered just before use and freed after
// (acquire/release), and a block's gradient, complete for a micro-batch, is reduce-scattered into
// the owners' shards and accumulated there in fp32 (grads_done). The global gradient norm is the
// all-reduced sum of the shards' partial sums of squares.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/data/packed_batch.hpp"
#include "src/memory/host_memory.hpp"
#include "src/model/llama_cpu.hpp"
#include "src/model/param_access.hpp"
#include "src/optim/adamw.hpp"

namespace longtune {

struct ShardLayout {
  int64_t total_len = 0;  // padded flat length, a multiple of world
  int64_t shard_len = 0;
  int world = 1;
  ShardLayout(int64_t flat_len, int world_size);
  int64_t begin(int r) const { return int64_t(r) * shard_len; }
  int64_t end(int r) const { return begin(r) + shard_len; }
  // Elements of [lo, hi) that each rank owns, in rank order.
  std::vector<int64_t> counts(int64_t lo, int64_t hi) const;
};

class ShardedTrainState final : public ParamAccess {
 public:
  // grad_dtype: F32 (the CPU engine, and the GPU engines by default) or BF16 (the GPU engine with
  // bf16 host gradients: 14 instead of 16 bytes per parameter of host state; the CPU engine's
  // ParamAccess and optimizer_step then refuse).
  ShardedTrainState(const ParamTable& table, Comm& comm, const AdamWConfig& adamw,
                    const NumaPlacement& placement = {}, DType grad_dtype = DType::F32);
  // Bytes of the host arena for a shard of shard_len elements.
  static size_t arena_bytes(int64_t shard_len, DType grad_dtype);

  const ShardLayout& layout() const { return layout_; }
  int64_t shard_begin() const { return layout_.begin(comm_.rank()); }
  int64_t shard_len() const { return layout_.shard_len; }
  float* master() { return master_; }
  float* exp_avg() { return exp_avg_; }
  float* exp_avg_sq() { return exp_avg_sq_; }
  float* grad_shard() { return grad_; }                 // F32 gradients, else null
  uint16_t* grad_shard_bf16() { return grad_bf16_; }    // BF16 gradients, else null
  DType grad_dtype() const { return grad_ ? DType::F32 : DType::BF16; }
  const HostArena& arena() const { return arena_; }
  Comm& comm() { return comm_; }

  // Flat elements [shard_begin(), shard_begin() + shard_data_len()) are the part of this shard
  // inside the table; the rest of the last shards is world-size padding, always zero.
  int64_t shard_data_len() const;
  // Initializes the master weights without the full model: fill(begin, end, dst) writes flat
  // elements [begin, end) (this shard's data range, possibly empty) into dst = master(); the
  // world-size padding is zeroed.
  void load_range(const std::function<void(int64_t begin, int64_t end, float* dst)>& fill);
  // Takes this rank's slice of full flat weights (small models and tests).
  void load_full(const float* flat);
  // All ranks: the full flat fp32 weights (table.total_elements()), for evaluation and tests.
  std::vector<float> gather_full();

  void zero_grads();
  // Global grad norm from shard partials, clipping, AdamW on this rank's shard.
  AdamWStepInfo optimizer_step(int64_t step, double lr);

  // ParamAccess
  void acquire(int block) override;
  void release(int block) override;
  const float* weight(size_t entry) override;
  float* grad(size_t entry) override;
  void grads_done(int block) override;

 private:
  const ParamTable& table_;
  Comm& comm_;
  ShardLayout layout_;
  HostArena arena_;
  float *master_, *exp_avg_, *exp_avg_sq_, *grad_;
  uint16_t* grad_bf16_;
  AdamW adamw_;
  struct BlockBuffers {
    std::vector<float> weights;  // gathered, while acquired
    std::vector<float> grads;    // full-block gradient of the current micro-batch
    int acquired = 0;
  };
  std::vector<BlockBuffers> blocks_;
  std::vector<float> piece_;  // reduce-scatter output
};

struct ShardedStepResult {
  LossSum loss;          // over the whole global batch (all ranks)
  AdamWStepInfo optim;
  int64_t tokens = 0;    // packed tokens of the whole global batch
  bool skipped = false;  // no counted target in the global batch
};

// One optimizer step: this rank's micro-batches with grad_scale 1 / global_targets, gradients
// reduce-scattered block by block, then the sharded AdamW step. Collective: every rank calls it.
ShardedStepResult sharded_train_step(LlamaCpu& model, ShardedTrainState& state,
                                     const std::vector<PackedBatch>& micro_batches, int64_t global_targets,
                                     int64_t step, double lr);

}  // namespace longtune
