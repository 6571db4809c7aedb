// The single-process training loop (CPU engine): data, model, host optimizer state, run directory,
// metrics, evaluation and checkpoints. Everything that can be wrong with the inputs is checked in
// the constructor, before any compute.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "src/comm/comm.hpp"
#include "src/train/train_config.hpp"

namespace longtune {

// Every rank of `comm` constructs a Trainer with the same configuration and calls run(); rank 0
// prints, writes metrics and commits checkpoints.
// How run() ended.
struct TrainOutcome {
  int stop_signal = 0;    // 0: ran to cfg.steps (or --stop-after); else the signal that stopped it
  int64_t last_step = 0;  // the last completed (and, after a signal, checkpointed) step
};

class Trainer {
 public:
  Trainer(TrainConfig cfg, Comm& comm);
  ~Trainer();
  // Trains to cfg.steps (from the resumed step), checkpointing and evaluating as configured. A stop
  // signal (src/train/stop_signal.hpp) received by any rank ends every rank after the same step,
  // with a checkpoint of that step; the outcome then names the signal.
  TrainOutcome run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longtune
