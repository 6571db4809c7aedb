// How the model reads weights and writes gradients, block by block (ParamTable blocks: embedding,
// each decoder layer, head). The model calls acquire(b) before using block b's weights and
// release(b) after; it adds block b's gradients through grad() and calls grads_done(b) once they
// are complete for the current micro-batch. A single process reads one flat buffer (FlatParams);
// the sharded engine gathers a block from all ranks on acquire and reduce-scatters its gradient
// on grads_done (src/train/sharded_state.hpp) -- the model cannot tell the difference.
#pragma once
#include <cstddef>

#include "src/model/param_table.hpp"

namespace longtune {

class ParamAccess {
 public:
  virtual ~ParamAccess() = default;
  virtual void acquire(int block) = 0;
  virtual void release(int block) = 0;
  // Weights of table entry `entry`; valid while its block is acquired.
  virtual const float* weight(size_t entry) = 0;
  // Gradient of entry `entry` (parameter gradients accumulate with +=); valid from the first call
  // for its block until grads_done(block).
  virtual float* grad(size_t entry) = 0;
  virtual void grads_done(int block) = 0;
};

// Everything in two flat buffers of ParamTable layout; acquire/release/grads_done do nothing.
class FlatParams final : public ParamAccess {
 public:
  FlatParams(const ParamTable& table, const float* params, float* grads = nullptr)
      : table_(table), params_(params), grads_(grads) {}
  void acquire(int) override {}
  void release(int) override {}
  const float* weight(size_t entry) override { return params_ + table_.at(entry).offset; }
  float* grad(size_t entry) override { return grads_ + table_.at(entry).offset; }
  void grads_done(int) override {}

 private:
  const ParamTable& table_;
  const float* params_;
  float* grads_;
};

}  // namespace longtune
