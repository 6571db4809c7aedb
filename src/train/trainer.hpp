// The single-process training loop (CPU engine): data, model, host optimizer state, run directory,
// metrics, evaluation and checkpoints. Everything that can be wrong with the inputs is checked in
// the constructor, before any compute.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "src/train/train_config.hpp"

namespace longtune {

class Trainer {
 public:
  explicit Trainer(TrainConfig cfg);
  ~Trainer();
  // Trains to cfg.steps (from the resumed step), checkpointing and evaluating as configured.
  void run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longtune
