// Graceful stop on SIGUSR1 / SIGTERM (Slurm preemption, time limits, `scancel --signal`), see
// docs/slurm.md. The handler only records the signal; the trainer polls once per optimizer step
// and the ranks agree through the Comm, so every rank stops after the same step, writes one
// checkpoint and exits with kExitRequeue. A second signal ends the process at once (_exit), which
// cannot damage a saved checkpoint: checkpoints are committed atomically (docs/checkpoints.md).
#pragma once
#include <string>

namespace longtune {

// Exit status of `longtune train` after a signal: checkpointed at the end of a step, run again
// (with the same run dir) to continue. 75 is EX_TEMPFAIL of <sysexits.h>: "try again later".
inline constexpr int kExitRequeue = 75;
// Exit status after a second signal: stopped at once, possibly mid-step; the newest complete
// checkpoint is whatever the last commit left (resume picks it as after any crash).
inline constexpr int kExitSecondSignal = 76;

// Installs the SIGUSR1 and SIGTERM handlers (idempotent). Throws SystemError if sigaction fails.
void install_stop_signal_handlers();
// The number of the first stop signal received by this process since the handlers were installed
// (or the last reset), 0 when none.
int stop_signal_received();
// Forgets a received signal (tests; a second signal is then a first one again).
void reset_stop_signal();
// "SIGUSR1", "SIGTERM", else "signal N".
std::string signal_name(int signo);

}  // namespace longtune
