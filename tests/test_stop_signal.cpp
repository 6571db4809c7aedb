// Stop on SIGUSR1/SIGTERM (src/train/stop_signal.hpp, docs/slurm.md): the flag logic, and a
// single-process run that receives the signal stops after the step it is in, with a checkpoint of
// that step, and resumes to weights byte-identical to an uninterrupted run. The multi-rank and
// Slurm cases are tests/crash/signal_test.py and tests/slurm/.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "io/checkpoint.hpp"
#include "src/comm/serial_comm.hpp"
#include "src/train/stop_signal.hpp"
#include "src/train/train_config.hpp"
#include "src/train/trainer.hpp"

namespace fs = std::filesystem;
using namespace longtune;

namespace {

// Installs the handlers for one test and puts the default actions back afterwards, so that the
// rest of the test binary (and ctest's timeout) sees ordinary SIGTERM behaviour.
struct HandlersScope {
  HandlersScope() {
    reset_stop_signal();
    install_stop_signal_handlers();
  }
  ~HandlersScope() {
    signal(SIGUSR1, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    reset_stop_signal();
  }
};

TrainConfig config(const fs::path& run_dir, int steps) {
  std::vector<std::string> words = {"train", "--seq-len", "96", "--micro-batch", "2", "--grad-accum", "2",
                                    "--steps", std::to_string(steps), "--warmup-steps", "2", "--run-dir",
                                    run_dir.string(), "--log-every", "100", "--eval-every", "-1"};
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  TrainConfig cfg;
  EXPECT_TRUE(parse_train_config(int(argv.size()), argv.data(), &cfg));
  return cfg;
}

std::vector<float> latest_master(const fs::path& run_dir, int64_t* step) {
  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint((run_dir / "ckpt").string(), &warnings);
  EXPECT_TRUE(ref.has_value());
  if (!ref) return {};
  *step = read_trainer_state(*ref).step;
  std::vector<float> master(size_t(ref->total_len)), m(master.size()), v(master.size());
  read_shard(*ref, 0, ref->total_len, master.data(), m.data(), v.data());
  return master;
}

}  // namespace

TEST(StopSignal, HandlerRecordsTheFirstSignalOnly) {
  HandlersScope scope;
  EXPECT_EQ(stop_signal_received(), 0);
  ASSERT_EQ(raise(SIGTERM), 0);
  EXPECT_EQ(stop_signal_received(), SIGTERM);
  reset_stop_signal();
  ASSERT_EQ(raise(SIGUSR1), 0);
  EXPECT_EQ(stop_signal_received(), SIGUSR1);
  EXPECT_EQ(signal_name(SIGUSR1), "SIGUSR1");
  EXPECT_EQ(signal_name(SIGTERM), "SIGTERM");
}

TEST(StopSignal, SecondSignalExitsAtOnceWith76) {
  // In a forked child: _exit must not end the test binary.
  EXPECT_EXIT(
      {
        reset_stop_signal();
        install_stop_signal_handlers();
        raise(SIGUSR1);
        raise(SIGUSR1);
        std::_Exit(0);  // not reached
      },
      ::testing::ExitedWithCode(kExitSecondSignal), "second stop signal");
}

TEST(StopSignal, TrainerCheckpointsTheCurrentStepAndResumesBitExactly) {
  const fs::path base = fs::temp_directory_path() / ("lt-stop-signal-" + std::to_string(::getpid()));
  fs::remove_all(base);
  {
    SerialComm comm;
    const TrainOutcome full = Trainer(config(base / "ref", 5), comm).run();
    EXPECT_EQ(full.stop_signal, 0);
    EXPECT_EQ(full.last_step, 5);
  }
  {
    HandlersScope scope;
    SerialComm comm;
    Trainer trainer(config(base / "sig", 5), comm);
    ASSERT_EQ(raise(SIGUSR1), 0);  // during set-up: acted on after the first step
    const TrainOutcome stopped = trainer.run();
    EXPECT_EQ(stopped.stop_signal, SIGUSR1);
    EXPECT_EQ(stopped.last_step, 1);
  }
  int64_t step = 0;
  latest_master(base / "sig", &step);
  EXPECT_EQ(step, 1);  // checkpoint-every 0 (end only): this one exists because of the signal
  {
    SerialComm comm;
    const TrainOutcome resumed = Trainer(config(base / "sig", 5), comm).run();
    EXPECT_EQ(resumed.stop_signal, 0);
  }
  int64_t s_ref = 0, s_sig = 0;
  const std::vector<float> ref = latest_master(base / "ref", &s_ref), got = latest_master(base / "sig", &s_sig);
  EXPECT_EQ(s_ref, 5);
  EXPECT_EQ(s_sig, 5);
  ASSERT_EQ(ref.size(), got.size());
  EXPECT_EQ(0, std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)));
  fs::remove_all(base);
}
