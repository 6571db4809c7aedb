#include "src/cli/commands.hpp"
#include "src/comm/comm.hpp"
#include "src/train/stop_signal.hpp"
#include "src/train/train_config.hpp"
#include "src/train/trainer.hpp"

namespace longtune::cli {

int run_train(int argc, char** argv) {
  TrainConfig cfg;
  if (!parse_train_config(argc, argv, &cfg)) return 0;  // --help
  const std::unique_ptr<Comm> comm = make_comm();  // MPI under mpirun/srun, else one process
  // After MPI's initialization, so that ours are the handlers in place. A signal during set-up is
  // acted on after the first step (or exits at once if a second one follows).
  install_stop_signal_handlers();
  Trainer trainer(cfg, *comm);                    // validates every input before any compute
  const TrainOutcome outcome = trainer.run();
  // docs/slurm.md: 75 = checkpointed on request, run again (requeue) to continue.
  return outcome.stop_signal != 0 ? kExitRequeue : 0;
}

}  // namespace longtune::cli
