#!/usr/bin/env python3
"""Stop-on-signal test of `longtune train` under mpirun (docs/slurm.md, "Signals and exit codes").

An uninterrupted reference run is trained and exported. Then, for each mode, a fresh run is
started, signalled once it has done a few steps, and must end with exit status 75 after writing a
checkpoint of the step it stopped at (every rank the same step, printed by rank 0); a second
launch in the same run directory must resume from exactly that step and finish with an export
byte-identical to the reference. Modes:
  rank     SIGUSR1 to one rank only (rank 1): the ranks agree through the Comm
  mpirun   SIGUSR1 to mpirun, which forwards SIGUSR1 to every rank (Open MPI)
  sigterm  SIGTERM to one rank only
  twice    two SIGUSR1 in a row to one rank: it exits at once with 76 (mpirun then ends the
           others); the newest committed checkpoint stays usable and the resumed run still ends
           byte-identical

Reuses the crash test's launcher and export comparison (tests/crash/crash_test.py).
Python 3 standard library only. Exit status 0 when every check passed.
"""
import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crash_test as ct  # noqa: E402

# The crash test's run, with checkpoints every 5 steps: a stop at another step shows that the
# signal itself wrote the checkpoint.
ct.TRAIN_ARGS = [a if a != "2" or ct.TRAIN_ARGS[i - 1] != "--checkpoint-every" else "5"
                 for i, a in enumerate(ct.TRAIN_ARGS)]
STOPPED = re.compile(r"\[train\] signal (SIGUSR1|SIGTERM): checkpointing step (\d+) and exiting for requeue \(exit 75\)")
EXIT_REQUEUE, EXIT_SECOND = 75, 76
MODES = ["rank", "mpirun", "sigterm", "twice"]


def log(msg):
    print(msg, flush=True)


def steps_done(run_dir):
    """Step records in metrics.jsonl (rank 0 flushes one per step)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if '"loss":' in line)
    except FileNotFoundError:
        return 0


def pending(pid, sig):
    """Whether `sig` is pending for process `pid` (thread or process-wide mask in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << (sig - 1)):
                    return True
    except OSError:
        return False
    return False


def rank_pid(launch, rank):
    """pid of MPI rank `rank` of a launch (Open MPI puts OMPI_COMM_WORLD_RANK in each rank's environment)."""
    for pid in launch.session_pids():
        if pid == launch.sid:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return pid
    return None


def run_mode(args, mode, work, ref_export):
    run_dir = os.path.join(work, f"run-{mode}")
    shutil.rmtree(run_dir, ignore_errors=True)
    launch = ct.Launch(args, run_dir, os.path.join(work, f"{mode}-1.log"))
    # Wait for a few steps (the run takes 24), so the signal lands mid-run.
    deadline = time.monotonic() + 60
    # `twice` waits past the periodic checkpoint of step 5, which the exit at once must leave usable.
    wait_steps = 6 if mode == "twice" else 3
    while steps_done(run_dir) < wait_steps:
        if launch.proc.poll() is not None or time.monotonic() > deadline:
            launch.kill_all()
            raise ct.Failure(f"{mode}: run ended or stalled before step {wait_steps}:\n{launch.output()}")
        time.sleep(0.01)
    target = launch.sid if mode == "mpirun" else rank_pid(launch, 1)
    if target is None:
        launch.kill_all()
        raise ct.Failure(f"{mode}: rank 1 not found among the launch's processes")
    sig = signal.SIGTERM if mode == "sigterm" else signal.SIGUSR1
    os.kill(target, sig)
    if mode == "twice":
        # A signal sent while the same one is still pending merges with it: wait for the first to
        # be delivered (the handler has run) before sending the second.
        deadline = time.monotonic() + 10
        while pending(target, sig) and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(target, sig)
    at_step = steps_done(run_dir)
    rc = first_rc = launch.wait(timeout=60)
    text = launch.output()
    ckpt = os.path.join(run_dir, "ckpt")
    latest = ct.latest_step(ckpt)
    if mode == "twice":
        # Usually 76 (the rank's own status, reported by mpirun); the second signal may also arrive
        # after the rank had already finished its checkpoint and exited 75.
        if rc not in (EXIT_SECOND, EXIT_REQUEUE):
            raise ct.Failure(f"{mode}: exit status {rc}, expected {EXIT_SECOND} (or {EXIT_REQUEUE}):\n{text}")
        stop = latest
        if rc == EXIT_REQUEUE and latest is None:
            raise ct.Failure(f"{mode}: exit 75 without a checkpoint:\n{text}")
        if rc == EXIT_SECOND and "second stop signal" not in text:
            raise ct.Failure(f"{mode}: exit 76 without the rank's message:\n{text}")
    else:
        if rc != EXIT_REQUEUE:
            raise ct.Failure(f"{mode}: exit status {rc}, expected {EXIT_REQUEUE}:\n{text}")
        m = STOPPED.search(text)
        if not m:
            raise ct.Failure(f"{mode}: no '[train] signal ...: checkpointing step N' line:\n{text}")
        if m.group(1) != sig.name:
            raise ct.Failure(f"{mode}: rank 0 reports {m.group(1)}, sent {sig.name}")
        stop = int(m.group(2))
        if not (at_step <= stop < 24):
            raise ct.Failure(f"{mode}: stopped at step {stop}, signalled after step {at_step} of 24")
        if latest != stop or not ct.complete(os.path.join(ckpt, f"step-{stop:08d}"), args.ranks):
            raise ct.Failure(f"{mode}: `latest` is step {latest}, expected the complete checkpoint of step {stop}")
        if "[train] done" in text:
            raise ct.Failure(f"{mode}: the run went on to the end after the signal:\n{text}")
    # Resume: the newest complete checkpoint (for `twice`, whatever the rule picks) to the end.
    expected, _ = ct.expected_resume(ckpt, args.ranks)
    launch = ct.Launch(args, run_dir, os.path.join(work, f"{mode}-2.log"))
    rc = launch.wait(timeout=60)
    text = launch.output()
    if rc != 0 or "[train] done" not in text:
        raise ct.Failure(f"{mode}: resumed launch failed ({rc}):\n{text}")
    m = ct.RESUMED.search(text)
    got = int(m.group(2)) if m else None
    if got != expected:
        raise ct.Failure(f"{mode}: resumed at step {got}, expected {expected}:\n{text}")
    out = os.path.join(work, f"{mode}-export")
    shutil.rmtree(out, ignore_errors=True)
    ct.export(args, run_dir, out)
    n, nbytes = ct.compare_exports(ref_export, out)
    log(f"[signal] {mode}: {sig.name}{' x2' if mode == 'twice' else ''} to {'mpirun' if mode == 'mpirun' else 'rank 1'} "
        f"after step {at_step}: exit {first_rc}, newest checkpoint step {stop}; resumed at step {got}, export byte-identical "
        f"({n} tensors, {nbytes} bytes)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--longtune", required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mpirun", default=shutil.which("mpirun") or "mpirun")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--workdir", help="keep logs and run directories here")
    args = p.parse_args()
    args.longtune = os.path.abspath(args.longtune)
    args.stdbuf = shutil.which("stdbuf")
    t0 = time.monotonic()
    work = args.workdir or tempfile.mkdtemp(prefix="longtune-signal-")
    os.makedirs(work, exist_ok=True)
    # Private Open MPI session and shared-memory directories, as in the crash test.
    args.ompi_tmp = tempfile.mkdtemp(prefix="lts-", dir="/tmp")
    args.ompi_shm = tempfile.mkdtemp(prefix="longtune-signal-shm-",
                                     dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else work)
    try:
        ref_run = os.path.join(work, "reference")
        shutil.rmtree(ref_run, ignore_errors=True)
        ref = ct.Launch(args, ref_run, os.path.join(work, "reference.log"))
        rc = ref.wait(timeout=120)
        if rc != 0 or "[train] done" not in ref.output():
            raise ct.Failure(f"reference run failed ({rc}):\n{ref.output()}")
        ref_export = os.path.join(work, "reference-export")
        shutil.rmtree(ref_export, ignore_errors=True)  # export refuses to overwrite (a kept --workdir)
        ct.export(args, ref_run, ref_export)
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise ct.Failure(f"--modes: unknown mode {mode!r} (expected {', '.join(MODES)})")
            run_mode(args, mode, work, ref_export)
    finally:
        shutil.rmtree(args.ompi_shm, ignore_errors=True)
        shutil.rmtree(args.ompi_tmp, ignore_errors=True)
    log(f"[signal] PASS in {time.monotonic() - t0:.1f} s")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ct.Failure as e:
        log(f"[signal] FAIL: {e}")
        sys.exit(1)
