#include "src/cli/commands.hpp"
#include "src/comm/comm.hpp"
#include "src/train/train_config.hpp"
#include "src/train/trainer.hpp"

namespace longtune::cli {

int run_train(int argc, char** argv) {
  TrainConfig cfg;
  if (!parse_train_config(argc, argv, &cfg)) return 0;  // --help
  const std::unique_ptr<Comm> comm = make_comm();  // MPI under mpirun/srun, else one process
  Trainer trainer(cfg, *comm);                    // validates every input before any compute
  trainer.run();
  return 0;
}

}  // namespace longtune::cli
