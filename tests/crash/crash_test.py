#!/usr/bin/env python3
"""Crash test of `longtune train` under mpirun (docs/testing.md, "Crash tests").

An uninterrupted reference run is trained and exported. Then the same run is started again and
again in a fresh run directory and killed with SIGKILL (every process of the launch at once:
mpirun and all ranks) at random moments -- after a random delay, or as soon as a checkpoint write
is seen in progress -- and restarted each time. Every restart must resume from the newest
complete checkpoint that the documented rule (docs/checkpoints.md, "Finding the checkpoint to
resume from") designates for what the killed launch left on disk, never from an older one; the
last restart runs to the end and its export must hold byte-identical tensors to the reference.

Python 3 standard library only. Exit status 0 when every check passed.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

TRAIN_ARGS = ["--seq-len", "96", "--micro-batch", "1", "--grad-accum", "2", "--steps", "24",
              "--checkpoint-every", "2", "--keep-last", "2", "--eval-every", "-1", "--warmup-steps", "1",
              "--log-every", "1000"]
STEP_DIR = re.compile(r"^step-(\d+)$")
REPLACED_DIR = re.compile(r"^\.replaced-step-(\d+)$")
RESUMED = re.compile(r"\[train\] resumed from (\S+) at step (\d+)")
# Lines that must not appear in the output of any launch (warnings are collected separately).
# mpirun's notice that a rank ended on its own (non-zero exit or a signal) and aborted the job.
MPI_ABORT = re.compile(r"returned\s+a non-zero exit code|exited on signal")
LONGTUNE_ERROR = re.compile(r"^longtune \w+: .*error", re.M)
BAD_LINE = re.compile(r"error|traceback|terminate called|assert|abort|segmentation|exception", re.I)


class Failure(Exception):
    pass


def log(msg):
    print(msg, flush=True)


# ---- launching and killing --------------------------------------------------------------------

def train_command(args, run_dir, tmp_dir, shm_dir):
    cmd = [args.mpirun, "-np", str(args.ranks), "--oversubscribe", "--bind-to", "none",
           "--mca", "orte_tmpdir_base", tmp_dir, "--mca", "btl_vader_backing_directory", shm_dir,
           "-x", "OMP_NUM_THREADS=1", "-x", "OMP_WAIT_POLICY=passive"]
    # Line-buffered stdout, so that "[train] resumed from ..." reaches the log before a kill.
    if args.stdbuf:
        cmd += [args.stdbuf, "-oL"]
    return cmd + [args.longtune, "train", "--run-dir", run_dir] + TRAIN_ARGS


def environment(tmp_dir=None):
    env = dict(os.environ)
    if tmp_dir is not None:
        env["TMPDIR"] = tmp_dir
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env["OMP_NUM_THREADS"] = "1"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


class Launch:
    """One `mpirun ... longtune train` in its own session, output to a log file."""

    def __init__(self, args, run_dir, log_path):
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        # Fresh session and shared-memory directories for every launch: a SIGKILLed job leaves its
        # vader_segment.<host>.<jobid>.<rank> files and session directory behind, and a later job
        # that draws the same job id (a hash of mpirun's pid) must never open them.
        tmp_dir = tempfile.mkdtemp(prefix="l", dir=args.ompi_tmp)
        shm_dir = tempfile.mkdtemp(prefix="launch-", dir=args.ompi_shm)
        self.proc = subprocess.Popen(train_command(args, run_dir, tmp_dir, shm_dir), stdout=self.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment(tmp_dir),
                                     start_new_session=True)
        self.sid = self.proc.pid  # session leader: mpirun

    def session_pids(self):
        """Every live process of this launch. Open MPI puts each rank in its own process group, so a
        killpg of mpirun's group would miss the ranks: find them by session id instead."""
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            # fields: state ppid pgrp session ...
            if int(fields[3]) == self.sid and fields[0] != b"Z":
                pids.append(int(name))
        return pids

    def kill_all(self):
        """SIGKILL every process of the launch, ranks first, then its process groups, until none is
        left; reaps mpirun."""
        deadline = time.monotonic() + 10
        while True:
            pids = self.session_pids()
            if not pids:
                break
            for pid in sorted(pids, key=lambda p: p == self.sid):  # mpirun last
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.returncode is None:  # mpirun not reaped yet: its pid (= pgid) is still ours
                try:
                    os.killpg(self.sid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() > deadline:
                raise Failure(f"processes {pids} of launch {self.sid} survive SIGKILL")
            time.sleep(0.005)
        self.proc.wait()
        self.log_file.close()

    def wait(self, timeout):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise Failure(f"{self.log_path}: run did not finish within {timeout:.0f} s")
        # A finished mpirun leaves no rank behind; make sure of it anyway.
        self.kill_all()
        return rc

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


# ---- what is on disk -----------------------------------------------------------------------------

def complete(step_dir, world):
    """A step directory holds exactly the rank files of `world` ranks (the trainer writes each rank
    file under a temporary name, fsyncs it and renames it: a file under its final name is whole)."""
    try:
        names = set(os.listdir(step_dir))
    except OSError:
        return False
    want = {f"rank-{r:05d}-of-{world:05d}.h5" for r in range(world)}
    rank_files = {n for n in names if n.startswith("rank-") and n.endswith(".h5")}
    return rank_files == want and all(os.path.getsize(os.path.join(step_dir, n)) > 0 for n in want)


def snapshot(ckpt):
    """(latest text or None, sorted entry names) of the checkpoint root."""
    try:
        names = sorted(os.listdir(ckpt))
    except FileNotFoundError:
        return None, []
    latest = None
    try:
        with open(os.path.join(ckpt, "latest")) as f:
            latest = f.read()
    except OSError:
        pass
    return latest, names


def expected_resume(ckpt, world):
    """(step or None, whether warnings may be printed) as docs/checkpoints.md's rule picks it from what is on disk."""
    latest, names = snapshot(ckpt)
    if latest is not None:
        m = STEP_DIR.match(latest.strip())
        if m and complete(os.path.join(ckpt, latest.strip()), world):
            return int(m.group(1)), False
    candidates = []
    for n in names:
        m = STEP_DIR.match(n)
        if m and complete(os.path.join(ckpt, n), world):
            candidates.append(int(m.group(1)))
        m = REPLACED_DIR.match(n)
        if m and n[len(".replaced-"):] not in names and complete(os.path.join(ckpt, n), world):
            candidates.append(int(m.group(1)))
    # Warnings are expected only here: `latest` missing or not naming a complete checkpoint.
    warn_ok = latest is not None or bool(candidates)
    return (max(candidates) if candidates else None), warn_ok


def latest_step(ckpt):
    latest, _ = snapshot(ckpt)
    m = STEP_DIR.match(latest.strip()) if latest else None
    return int(m.group(1)) if m else None


def write_in_progress(ckpt):
    """Names showing a checkpoint write in progress: .tmp-step-* directories (with the rank files
    and their temporary files inside), .replaced-step-*, .deleting-step-*, a step-N newer than
    `latest` (committed, `latest` not yet rewritten)."""
    latest, names = snapshot(ckpt)
    found = []
    lstep = latest_step(ckpt)
    for n in names:
        if n.startswith((".tmp-step-", ".replaced-step-", ".deleting-step-")):
            try:
                inner = sorted(os.listdir(os.path.join(ckpt, n)))
            except OSError:
                inner = []
            found.append(n + "/{" + ",".join(inner) + "}")
        elif n.startswith(".latest") or (n != "latest" and n.startswith("latest")):
            found.append(n)
        else:
            m = STEP_DIR.match(n)
            if m and (lstep is None or int(m.group(1)) > lstep):
                found.append(n + " (newer than latest)")
    return found


def tmp_dirs(ckpt):
    """{(name, inode)} of the .tmp-step-* directories now in ckpt."""
    out = set()
    try:
        with os.scandir(ckpt) as it:
            for e in it:
                if e.name.startswith(".tmp-step-"):
                    try:
                        out.add((e.name, e.inode()))
                    except OSError:
                        pass
    except FileNotFoundError:
        pass
    return out


def has_rank_temp_file(ckpt, fresh_dirs):
    for name, _ in fresh_dirs:
        try:
            if any(n.startswith(".rank-") for n in os.listdir(os.path.join(ckpt, name))):
                return True
        except OSError:
            pass
    return False


# ---- export and comparison -----------------------------------------------------------------------

def export(args, run_dir, out):
    r = subprocess.run([args.longtune, "export", "--run-dir", run_dir, "--out", out, "--dtype", "fp32"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(), timeout=120)
    if r.returncode != 0:
        raise Failure(f"export of {run_dir} failed ({r.returncode}):\n{r.stdout.decode(errors='replace')}")


def read_tensors(export_dir):
    """{name: (dtype, shape, bytes)} of every tensor of every *.safetensors file."""
    tensors = {}
    files = sorted(f for f in os.listdir(export_dir) if f.endswith(".safetensors"))
    if not files:
        raise Failure(f"{export_dir}: no .safetensors file")
    for fname in files:
        with open(os.path.join(export_dir, fname), "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            if name in tensors:
                raise Failure(f"{export_dir}: tensor {name} in two files")
            tensors[name] = (info["dtype"], tuple(info["shape"]), data[base + b:base + e])
    return tensors


def compare_exports(ref_dir, got_dir):
    ref, got = read_tensors(ref_dir), read_tensors(got_dir)
    if set(ref) != set(got):
        raise Failure(f"{got_dir}: tensor names differ from the reference: "
                      f"missing {sorted(set(ref) - set(got))}, extra {sorted(set(got) - set(ref))}")
    for name in sorted(ref):
        if ref[name][:2] != got[name][:2]:
            raise Failure(f"{got_dir}: {name}: dtype/shape {got[name][:2]}, reference {ref[name][:2]}")
        if ref[name][2] != got[name][2]:
            a, b = ref[name][2], got[name][2]
            i = next(k for k in range(len(a)) if a[k] != b[k])
            raise Failure(f"{got_dir}: {name}: bytes differ from the reference (first at byte {i}, element {i // 4})")
    return len(ref), sum(len(v[2]) for v in ref.values())


# ---- the test -------------------------------------------------------------------------------------

def check_output(text, where, allow_warnings):
    warnings = []
    for line in text.splitlines():
        if "warning" in line.lower():
            if not allow_warnings:
                raise Failure(f"{where}: unexpected warning: {line}")
            warnings.append(line)
            continue
        if BAD_LINE.search(line):
            raise Failure(f"{where}: unexpected line: {line}")
    return warnings


def main(args):
    try:
        return run_test(args)
    finally:
        shutil.rmtree(getattr(args, "ompi_shm", None) or "/nonexistent", ignore_errors=True)
        shutil.rmtree(getattr(args, "ompi_tmp", None) or "/nonexistent", ignore_errors=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--longtune", required=True, help="path of the longtune binary")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--trials", type=int, default=20, help="kills to perform")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--budget", type=float, default=240, help="seconds the whole test may take")
    p.add_argument("--write-fraction", type=float, default=0.5,
                   help="fraction of trials that kill as soon as a checkpoint write is seen")
    p.add_argument("--tolerate-unplanned", type=int, default=0,
                   help="launches that may die before their kill with no error message of their own (a rank "
                        "SIGKILLed from outside, e.g. by another job on a shared machine); 0 in CI")
    p.add_argument("--mpirun", default=shutil.which("mpirun") or "mpirun")
    p.add_argument("--workdir", help="keep the run directories here (default: a temporary directory, removed on success)")
    return p.parse_args()


def run_test(args):
    args.longtune = os.path.abspath(args.longtune)
    args.stdbuf = shutil.which("stdbuf")
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    work = args.workdir or tempfile.mkdtemp(prefix="longtune-crash-")
    os.makedirs(work, exist_ok=True)
    # A SIGKILLed mpirun leaves its session directory (TMPDIR/ompi.*/pid.N) and its ranks' shared
    # memory segments (vader_segment.*) behind. Keep them in private directories, removed at the
    # end, so that they neither litter the machine nor meet another job's (pids wrap around).
    # (Short paths: Open MPI's sockets live in the session directory.)
    args.ompi_tmp = tempfile.mkdtemp(prefix="ltc-", dir="/tmp" if os.access("/tmp", os.W_OK) else work)
    shm_base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else work
    args.ompi_shm = tempfile.mkdtemp(prefix="longtune-crash-shm-", dir=shm_base)
    log(f"[crash] {args.ranks} ranks, {args.trials} trials, seed {args.seed}, budget {args.budget:.0f} s, work dir {work}")

    def remaining():
        return args.budget - (time.monotonic() - t_start)

    def check_budget():
        if remaining() < 0:
            raise Failure(f"time budget of {args.budget:.0f} s exceeded")

    # (a) the uninterrupted reference.
    ref_run = os.path.join(work, "reference")
    shutil.rmtree(ref_run, ignore_errors=True)
    t0 = time.monotonic()
    ref = Launch(args, ref_run, os.path.join(work, "reference.log"))
    rc = ref.wait(timeout=max(30.0, remaining()))
    ref_secs = time.monotonic() - t0
    text = ref.output()
    if rc != 0 or "[train] done" not in text:
        raise Failure(f"reference run failed ({rc}):\n{text}")
    check_output(text, "reference run", allow_warnings=False)
    export(args, ref_run, os.path.join(work, "reference-export"))
    log(f"[crash] reference: {ref_secs:.1f} s uninterrupted, exported")

    # Delays: up to about one uninterrupted run, so kills land in start-up, resume, steps and
    # checkpoint writes alike; write-triggered trials poll for a write in progress instead.
    max_delay = max(0.5, min(ref_secs, 8.0))

    unplanned = 0      # launches that died on their own, tolerated
    trials = []        # dicts, one per kill
    resumes = []       # (run index, expected, got)
    warnings_seen = []
    completed_runs = 0
    run_index = 0
    launch_no = 0
    final_done = False
    while not final_done:
        run_index += 1
        run_dir = os.path.join(work, f"run-{run_index:02d}")
        shutil.rmtree(run_dir, ignore_errors=True)
        ckpt = os.path.join(run_dir, "ckpt")
        floor = None  # newest step this run dir has resumed from, or had in `latest` before a kill
        while True:
            check_budget()
            expected, fallback = expected_resume(ckpt, args.ranks)
            last = len(trials) >= args.trials
            launch_no += 1
            left_before = set(write_in_progress(ckpt))
            launch = Launch(args, run_dir, os.path.join(work, f"launch-{launch_no:03d}.log"))
            t_launch = time.monotonic()
            kind, detail = None, ""
            if not last:
                if rng.random() < args.write_fraction:
                    # Kill as soon as a new checkpoint write shows up: its temporary directory,
                    # or a rank's temporary file inside it, plus a random few milliseconds.
                    kind = "write"
                    target = rng.choice(["tmp-dir", "rank-temp-file"])
                    jitter = rng.choice([0.0, 0.0, rng.uniform(0, 0.004), rng.uniform(0, 0.02)])
                    stale = tmp_dirs(ckpt)
                    limit = t_launch + max_delay + 5
                    while launch.proc.poll() is None and time.monotonic() < limit:
                        fresh = tmp_dirs(ckpt) - stale
                        if fresh and (target == "tmp-dir" or has_rank_temp_file(ckpt, fresh)):
                            if jitter:
                                time.sleep(jitter)
                            break
                        time.sleep(0.0005)
                    detail = f"on {target} + {jitter * 1000:.1f} ms"
                else:
                    kind = "timed"
                    delay = rng.uniform(0.05, max_delay)
                    detail = f"after {delay:.2f} s"
                    end = t_launch + delay
                    while launch.proc.poll() is None and time.monotonic() < end:
                        time.sleep(0.002)
            if kind is not None and launch.proc.poll() is None:
                before = latest_step(ckpt)
                launch.kill_all()
                at = time.monotonic() - t_launch
                # Leftovers of an earlier kill that this launch did not touch do not count.
                in_write = [w for w in write_in_progress(ckpt) if w not in left_before]
                trial = {"n": len(trials) + 1, "run": run_index, "launch": launch_no, "trigger": kind,
                         "detail": detail, "at": at, "latest_before": before,
                         "during": "checkpoint write" if in_write else "step/start-up", "left": in_write}
                trials.append(trial)
                rc = None
            else:
                rc = launch.wait(timeout=max(30.0, remaining()))
            text = launch.output()
            if rc is None and MPI_ABORT.search(text):
                rc = "aborted by mpirun before the kill"
            if rc not in (None, 0):
                if MPI_ABORT.search(text) and not LONGTUNE_ERROR.search(text) and unplanned < args.tolerate_unplanned:
                    # A rank died with no message of its own: killed from outside (see --tolerate-unplanned).
                    unplanned += 1
                    log(f"[crash] launch {launch_no}: a rank died with no error message of its own (killed from "
                        f"outside the test?), tolerated ({unplanned}/{args.tolerate_unplanned}); restarting")
                    continue
                raise Failure(f"launch {launch_no} exited with status {rc} before any kill ({kind} trial):\n{text}")
            m = RESUMED.search(text)
            got = int(m.group(2)) if m else None
            if m:
                if expected is None:
                    raise Failure(f"launch {launch_no}: resumed from {m.group(1)} though no complete checkpoint existed")
                if got != expected:
                    raise Failure(f"launch {launch_no}: resumed at step {got} from {m.group(1)}, expected step "
                                  f"{expected} (newest complete checkpoint per docs/checkpoints.md)")
                if os.path.basename(m.group(1).rstrip("/")) not in (f"step-{expected:08d}", f".replaced-step-{expected:08d}"):
                    raise Failure(f"launch {launch_no}: resumed from {m.group(1)}, expected step-{expected:08d}")
                resumes.append((run_index, expected, got))
            elif expected is not None and (rc is not None or "[train] model:" in text):
                # Past start-up (or finished) without resuming although a checkpoint was there.
                raise Failure(f"launch {launch_no}: did not resume although step {expected} was complete:\n{text}")
            if floor is not None and expected is not None and expected < floor:
                raise Failure(f"launch {launch_no}: newest complete checkpoint is step {expected}, older than step "
                              f"{floor} that this run had already committed")
            if expected is not None:
                floor = max(floor or 0, expected)
            warnings_seen += check_output(text, f"launch {launch_no}", allow_warnings=True)
            if any("warning" in l.lower() for l in text.splitlines()) and not fallback:
                raise Failure(f"launch {launch_no}: warning although `latest` named a complete checkpoint:\n{text}")
            if kind is not None and rc is None:
                t = trials[-1]
                if t["latest_before"] is not None:
                    floor = max(floor or 0, t["latest_before"])
                log(f"[crash] trial {t['n']:2d}: run {run_index} launch {launch_no} ({'resumed at ' + str(got) if m else 'fresh' if expected is None else 'killed before resume'}), "
                    f"{t['trigger']} kill {t['detail']} at {t['at']:.2f} s during {t['during']}"
                    + (f" {t['left']}" if t['left'] else "") + f"; latest then {latest_step(ckpt)}")
                continue
            # The launch ran to its end.
            if rc != 0 or "[train] done" not in text:
                raise Failure(f"launch {launch_no} failed (exit {rc}):\n{text}")
            completed_runs += 1
            out = os.path.join(work, f"run-{run_index:02d}-export")
            export(args, run_dir, out)
            ntensors, nbytes = compare_exports(os.path.join(work, "reference-export"), out)
            log(f"[crash] run {run_index} finished (launch {launch_no}, resumed at {got}): export byte-identical "
                f"to the reference ({ntensors} tensors, {nbytes} bytes)")
            final_done = last
            break

    elapsed = time.monotonic() - t_start
    if elapsed > args.budget:
        raise Failure(f"took {elapsed:.0f} s, over the budget of {args.budget:.0f} s")
    n_write = sum(t["during"] == "checkpoint write" for t in trials)
    log(f"[crash] summary: {len(trials)} kills in {run_index} run dirs ({launch_no} launches, {completed_runs} "
        f"finished runs, all byte-identical to the reference)")
    log(f"[crash]   kills during checkpoint writes: {n_write} (write-triggered {sum(t['trigger'] == 'write' for t in trials)}), "
        f"during steps/start-up: {len(trials) - n_write}")
    log(f"[crash]   resumed at steps: {[g for _, _, g in resumes]}")
    if warnings_seen:
        log(f"[crash]   expected fallback warnings: {len(warnings_seen)}")
        for w in warnings_seen:
            log(f"[crash]     {w}")
    if unplanned:
        log(f"[crash]   launches that died on their own (tolerated): {unplanned}")
    log(f"[crash] PASS in {elapsed:.1f} s")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except Failure as e:
        log(f"[crash] FAIL: {e}")
        sys.exit(1)
