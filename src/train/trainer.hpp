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
class Trainer {
 public:
  Trainer(TrainConfig cfg, Comm& comm);
  ~Trainer();
  // Trains to cfg.steps (from the resumed step), checkpointing and evaluating as configured.
  void run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longtune
