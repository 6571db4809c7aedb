#include "src/cli/commands.hpp"
#include "src/train/train_config.hpp"
#include "src/train/trainer.hpp"

namespace longtune::cli {

int run_train(int argc, char** argv) {
  TrainConfig cfg;
  if (!parse_train_config(argc, argv, &cfg)) return 0;  // --help
  Trainer trainer(cfg);  // validates every input before any compute
  trainer.run();
  return 0;
}

}  // namespace longtune::cli
