#include "src/train/stop_signal.hpp"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "src/common/error.hpp"

namespace longtune {

namespace {

// Written only by the handler (and reset_stop_signal), read by the trainer between steps.
// sig_atomic_t is the only type the handler may portably store to.
volatile sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signo) {
  if (g_stop_signal != 0) {
    // Second signal: the user (or Slurm's KillWait) wants the process gone now. Only
    // async-signal-safe calls here: write(2) and _exit(2). The write's result is ignored on
    // purpose: there is nothing a handler could do about a closed stderr.
    static const char msg[] = "longtune: second stop signal, exiting at once (exit 76)\n";
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    _exit(kExitSecondSignal);
  }
  g_stop_signal = signo;
}

}  // namespace

void install_stop_signal_handlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop_signal;
  // SA_RESTART: a signal arriving during a checkpoint write or an MPI wait must not turn a
  // system call into EINTR somewhere deep in HDF5 or MPI; the step finishes as if nothing happened.
  sa.sa_flags = SA_RESTART;
  if (sigemptyset(&sa.sa_mask) != 0)
    throw SystemError(std::string("sigemptyset: ") + std::strerror(errno));
  for (int signo : {SIGUSR1, SIGTERM}) {
    if (sigaction(signo, &sa, nullptr) != 0)
      throw SystemError("sigaction(" + signal_name(signo) + "): " + std::strerror(errno));
  }
}

int stop_signal_received() { return int(g_stop_signal); }

void reset_stop_signal() { g_stop_signal = 0; }

std::string signal_name(int signo) {
  if (signo == SIGUSR1) return "SIGUSR1";
  if (signo == SIGTERM) return "SIGTERM";
  return "signal " + std::to_string(signo);
}

}  // namespace longtune
