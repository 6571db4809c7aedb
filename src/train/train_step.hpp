// One optimizer step of the single-process CPU engine: forward/backward over the micro-batches
// of a global batch, then AdamW on the host state. Shared by `longtune train` and the end-to-end
// golden tests, so both exercise the same code.
#pragma once
#include <cstdint>
#include <vector>

#include "src/data/packed_batch.hpp"
#include "src/memory/host_memory.hpp"
#include "src/model/llama_cpu.hpp"
#include "src/optim/adamw.hpp"

namespace longtune {

// The rank's optimizer state in one NUMA-placed host allocation: fp32 master weights, AdamW
// moments and the gradient accumulator, each `length` elements in ParamTable layout.
class HostTrainState {
 public:
  HostTrainState(const ParamTable& table, const AdamWConfig& adamw, const NumaPlacement& placement = {});
  int64_t length() const { return length_; }
  float* master() { return master_; }
  float* exp_avg() { return exp_avg_; }
  float* exp_avg_sq() { return exp_avg_sq_; }
  float* grad() { return grad_; }
  const float* master() const { return master_; }
  const AdamW& optimizer() const { return adamw_; }
  AdamW& optimizer() { return adamw_; }
  const HostArena& arena() const { return arena_; }

 private:
  int64_t length_;
  HostArena arena_;
  float *master_, *exp_avg_, *exp_avg_sq_, *grad_;
  AdamW adamw_;
};

struct StepResult {
  LossSum loss;           // over the whole global batch
  AdamWStepInfo optim;    // grad norm, clip coefficient, lr
  int64_t tokens = 0;     // packed tokens processed (padding included)
  bool skipped = false;   // no counted target in the batch: no update
};

// Zeroes the gradient, accumulates forward_backward over this rank's `micro_batches` with
// grad_scale 1 / global_targets (counted targets of the whole global batch), and applies AdamW step
// `step` (>= 1) at learning rate lr. Loss and tokens in the result are this rank's.
StepResult train_step(LlamaCpu& model, HostTrainState& state, const std::vector<PackedBatch>& micro_batches,
                      int64_t global_targets, int64_t step, double lr);
// Single rank: the micro-batches are the whole global batch.
StepResult train_step(LlamaCpu& model, HostTrainState& state, const std::vector<PackedBatch>& micro_batches,
                      int64_t step, double lr);

}  // namespace longtune
