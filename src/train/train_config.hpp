// `longtune train` configuration: one table of options that serves both the command line
// (--seq-len 4096) and INI config files ([data] seq-len = 4096). Command-line values override the
// file. Validated as a whole before anything is loaded or computed.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "src/optim/adamw.hpp"
#include "src/optim/lr_schedule.hpp"

namespace longtune {

struct TrainConfig {
  // [model]
  std::string model_dir;          // Hugging Face directory; empty: the built-in tiny model
  uint64_t init_seed = 1234;      // built-in model only
  // [data]
  std::string data;               // HDF5 token dataset; empty: the built-in task
  std::string eval_data;          // held-out dataset; built-in task: generated
  int64_t seq_len = 0;            // 0: the built-in default (or 4096 with a real model)
  int64_t micro_batch = 0;        // rows per forward/backward
  int64_t grad_accum = 0;         // micro-batches per optimizer step (per rank)
  bool shuffle = true;
  uint64_t seed = 0;              // data order
  // [optim]
  AdamWConfig adamw;
  std::string schedule = "cosine";
  int64_t warmup_steps = -1;      // -1: the default for the task
  double min_lr_ratio = 0.0;
  // [train]
  int64_t steps = 0;
  std::string run_dir = "runs/default";
  int64_t checkpoint_every = 0;   // 0: only at the end
  int64_t keep_last = 2;
  std::string resume = "auto";    // auto | none | PATH of a step directory
  int64_t eval_every = 0;         // 0: only at the end, -1: never
  int64_t log_every = 1;
  int64_t stop_after = 0;         // end this invocation after N steps, with a checkpoint (0: run to `steps`)
  int threads = 0;                // host threads for Kokkos/OpenMP (0: OMP_NUM_THREADS or all)
  // [gpu]
  std::string device = "cpu";     // cpu | cuda (one GPU per rank)
  std::string dtype = "bf16";     // compute dtype on the GPU: bf16 | fp16 (fp16: dynamic loss scaling)
  std::string recompute = "auto"; // activations: none (keep all) | layer (keep layer inputs) | auto (none if it fits)
  std::string attention = "auto"; // attention kernel: auto | tensor-core | sm75 (fp16 only: the V100/T4 path) | cudnn
  std::string offload = "none";   // none | optimizer (fp32 state + AdamW on the host) | params (also stream the weights)
  std::string weights = "resident"; // resident (every GPU holds all compute weights) | streamed (per block, ZeRO-3)
  bool delayed_update = false;    // offload optimizer: overlap step t's CPU update with step t + 1 (one step stale)
  std::string grad_reduce_dtype = "fp32"; // gradient reduce-scatter on the wire: fp32 | bf16 (half the bytes)
  std::string gpu_mem_limit;      // e.g. 16GiB: cap the device memory this rank may use (emulates a smaller GPU)
  std::string host_grad_dtype = "fp32";  // offload: host gradient accumulator fp32 | bf16 (2 B/param less host memory)
  std::string host_weights = "copy";     // offload: copy (bf16 copy of the shard on the host) | master (fetch fp32, convert on the GPU)
  bool offload_activations = false; // recompute layer/auto: the saved layer inputs in pinned host memory
  int64_t mlp_chunk = 0;          // recompute layer/auto: tokens per MLP tile (0: the whole micro-batch)

  bool builtin_model() const { return model_dir.empty(); }
  bool builtin_data() const { return data.empty(); }
};

// "16GiB", "48G", "512MiB", "1.5TiB", "123456" (bytes; K/M/G/T and KiB/MiB/GiB/TiB are powers of
// 1024) -> bytes. Throws ConfigError naming `what` on anything else.
int64_t parse_byte_size(const std::string& text, const std::string& what);

// Parses argv (after "train"); a --config FILE is read as INI. Fills in task defaults for unset
// values, validates, and throws ConfigError naming the file or option and what was expected.
// Returns false when --help was printed.
bool parse_train_config(int argc, char** argv, TrainConfig* out);

// The resolved configuration as an INI file (every key, in sections), as saved in the run dir.
std::string to_ini(const TrainConfig& cfg);

}  // namespace longtune
