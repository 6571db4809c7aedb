// AdamW on the host (ZeRO-Offload): one fused pass over a rank's flat fp32 arrays, run by Kokkos
// (OpenMP backend) on the CPU cores of the rank's NUMA node.
//
// Per element of every range, in fp32, in exactly this order (torch.optim.AdamW, single-tensor /
// foreach / fused CPU, amsgrad=False, maximize=False):
//   g  = g * c                         c = clip coefficient (1 when not clipping; g is not written back)
//   p  = p * (1 - lr * wd)             decay ranges only (tensors with >= 2 dims)
//   m  = m + (1 - beta1) * (g - m)     torch's lerp(m, g, 1 - beta1) for a weight < 0.5
//   v  = v * beta2 + (1 - beta2) * g * g
//   denom = sqrt(v) / sqrt(bc2) + eps
//   p  = p + (-step_size * m) / denom  i.e. p -= step_size * m / denom
//   out = bf16(p) or fp16(p)           optional compute-dtype copy, round to nearest even, same pass
// with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step, step_size = lr / bc1 computed in double and
// every scalar rounded to fp32 once, as torch does with Python floats. No FMA contraction, so every
// SIMD width (SSE2, AVX2, AVX-512) and the scalar path give bit-identical results, and the result
// does not depend on the thread count. Padding between ranges is never read or written.
//
// Global-norm clipping as torch.nn.utils.clip_grad_norm_(params, max_norm):
//   total = sqrt(sum g^2)  (fp32 squares summed in double, over the ranges only)
//   c     = min(max_norm / (total + 1e-6), 1) in fp32; clip <= 0 disables (c = 1).
// The sum is deterministic: fixed-size blocks with fixed lane order, block partials added in
// block order, so it too is independent of the thread count.
// Sharded training: each rank calls grad_norm_sq() on its shard, all-reduces the sums, takes the
// sqrt, then clip_coefficient() and update(); step() does the three for a single rank.
//
// Kokkos must be initialized (src/optim/kokkos_scope.hpp) before an AdamW is used.
#pragma once
#include <cstdint>
#include <string_view>
#include <vector>

#include "src/common/dtype.hpp"

namespace longtune {

class ParamTable;

struct AdamWConfig {
  double lr = 1e-3;            // base learning rate; the schedule (lr_schedule.hpp) gives each step's
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // decoupled, only on ranges with decay = true
  double clip = 1.0;           // max global gradient norm; <= 0 disables clipping
};
// Throws ConfigError for values torch.optim.AdamW rejects (lr < 0, betas outside [0, 1), eps < 0,
// weight_decay < 0) or non-finite ones.
void validate(const AdamWConfig& cfg);

// A contiguous run of trained elements in a flat array, and whether weight decay applies.
struct OptimRange {
  int64_t offset = 0;
  int64_t numel = 0;
  bool decay = false;
};
// One range per tensor of the table (decay = tensor has >= 2 dims), in offset order. The
// alignment padding between tensors is in no range.
std::vector<OptimRange> optim_ranges(const ParamTable& table);
// The parts of `ranges` inside [begin, end), with offsets relative to `begin` (a rank's shard).
std::vector<OptimRange> shard_ranges(const std::vector<OptimRange>& ranges, int64_t begin, int64_t end);

// The arrays of one update, each `length` elements (the shard length, padding included).
struct AdamWBuffers {
  float* master = nullptr;      // fp32 master weights, updated in place
  float* exp_avg = nullptr;     // m, updated in place
  float* exp_avg_sq = nullptr;  // v, updated in place
  const float* grad = nullptr;  // fp32 gradient, read only (the clip coefficient is applied on the fly)
  uint16_t* compute = nullptr;  // optional: receives compute_dtype(master) after the update
  DType compute_dtype = DType::BF16;  // BF16 or F16
  // Or a bf16 gradient (ZeRO-Offload with bf16 host gradients: 2 bytes per parameter less host
  // memory); exactly one of grad / grad_bf16. Each block is widened to fp32 (exact) before the same
  // math, so the update equals the fp32 one on the widened values bit for bit.
  const uint16_t* grad_bf16 = nullptr;
};

// The fp32 scalars of one update (optimizer step `step` >= 1, learning rate `lr`), each rounded
// once from double exactly as AdamW::update forms them. The GPU update (kernels/cuda/adamw.cuh,
// AdamWScalars: same field names) is filled from this, so both give bit-identical results.
struct AdamWStepScalars {
  float lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  float one_minus_beta1 = 0;  // 1 - beta1
  float one_minus_beta2 = 0;  // 1 - beta2
  float lr_times_wd = 0;      // lr * weight_decay
  float step_size = 0;        // lr / (1 - beta1^step); the update adds (-step_size * m) / denom
  float sqrt_bc2 = 0;         // sqrt(1 - beta2^step)
  float grad_coef = 1;        // multiplies g on the fly (clip coefficient, 1 / loss scale)
  float decay_factor = 1;     // 1 - lr * weight_decay (1 when weight_decay == 0), decay ranges only
};
AdamWStepScalars adamw_step_scalars(const AdamWConfig& cfg, int64_t step, double lr, float grad_coef = 1.0f);

struct AdamWStepInfo {
  double grad_norm = 0.0;  // global norm before clipping (for logging)
  float clip_coef = 1.0f;  // coefficient applied to the gradient
  double lr = 0.0;         // learning rate used
};

// Which code runs the update. Results are bit-identical for every choice.
enum class SimdLevel { Auto, Scalar, SSE2, AVX2, AVX512 };
std::string_view simd_level_name(SimdLevel s);
// The widest level this CPU supports (Auto resolves to it; LONGTUNE_SIMD=scalar|sse2|avx2|avx512 in
// the environment caps it).
SimdLevel best_simd_level();
bool simd_level_supported(SimdLevel s);

// Store kind of the update: ordinary stores, streaming (non-temporal) stores for the write-only
// compute copy (saves the read-for-ownership of its cache lines), or streaming stores everywhere.
// No effect on the results; the default was chosen by `longtune bench adamw` (docs/benchmarks.md).
enum class StreamingStores { None = 0, ComputeCopy = 1, All = 2 };
std::string_view streaming_stores_name(StreamingStores s);

struct AdamWExecution {
  bool serial = false;  // Kokkos::Serial instead of the threaded host space (tests, debugging)
  SimdLevel simd = SimdLevel::Auto;
  StreamingStores streaming = StreamingStores::ComputeCopy;
};

class AdamW {
 public:
  // `ranges` must lie inside [0, length) and not overlap (InternalError otherwise).
  AdamW(std::vector<OptimRange> ranges, int64_t length, const AdamWConfig& cfg, AdamWExecution exec = {});

  const AdamWConfig& config() const { return cfg_; }
  void set_config(const AdamWConfig& cfg);
  int64_t length() const { return length_; }
  int64_t num_trained() const { return trained_; }  // elements inside the ranges
  SimdLevel simd() const { return simd_; }
  StreamingStores streaming() const { return streaming_; }

  // Sum of g^2 over the ranges, in double (a rank's share of the squared global norm).
  double grad_norm_sq(const float* grad) const;
  double grad_norm_sq(const uint16_t* grad_bf16) const;  // the same sum over widened bf16 values
  // min(clip / (total_norm + 1e-6), 1) in fp32 as clip_grad_norm_ computes it; 1 when clip <= 0.
  float clip_coefficient(double total_norm) const;
  // One AdamW update with optimizer step number `step` (>= 1) and learning rate `lr`; the gradient
  // is multiplied by grad_coef (the clip coefficient) on the fly.
  void update(const AdamWBuffers& b, int64_t step, double lr, float grad_coef = 1.0f) const;
  // Single rank: grad_norm_sq, clip_coefficient, update.
  AdamWStepInfo step(const AdamWBuffers& b, int64_t step, double lr) const;

  // Faults in the pages of the buffers' ranges with the update's own thread split (thread t
  // touches what it will update), for memory without a NUMA policy or to pre-fault before pinning.
  void first_touch(const AdamWBuffers& b) const;

  struct Block {  // a piece of one range, at most kBlock elements
    int64_t begin;
    int32_t count;
    int32_t decay;
  };
  static constexpr int64_t kBlock = 8192;

 private:
  void check_buffers(const AdamWBuffers& b) const;
  double grad_norm_sq_impl(const float* grad, const uint16_t* grad_bf16) const;
  AdamWConfig cfg_;
  std::vector<OptimRange> ranges_;
  int64_t length_ = 0, trained_ = 0;
  bool serial_ = false;
  SimdLevel simd_ = SimdLevel::Auto;
  StreamingStores streaming_ = StreamingStores::ComputeCopy;
  std::vector<Block> blocks_;
  mutable std::vector<double> partial_;  // per-block sums of g^2 (not thread-safe across calls)
};

}  // namespace longtune
