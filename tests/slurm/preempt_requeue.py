#!/usr/bin/env python3
"""Slurm preemption test (docs/slurm.md, "The test"): on a one-machine Slurm cluster
(slurm/local-cluster), `sbatch jobs/cpu-smoke.slurm`, wait for a few steps, send SIGUSR1 to the
batch shell (`scancel --signal=USR1 --batch`, what `#SBATCH --signal=B:USR1@T` does before the
time limit); the job script forwards it to the srun step, every rank checkpoints the same step and
exits 75, the script requeues the job, the job runs again, resumes from that checkpoint and
finishes. Its export must be byte-identical to an uninterrupted run of the same recipe.

Exit status: 0 passed, 1 failed, 77 skipped (Slurm or munge missing, or the cluster cannot start).
Python 3 standard library only.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "crash"))
import crash_test as ct  # noqa: E402

SKIP = 77
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def log(msg):
    print(f"[slurm-test] {msg}", flush=True)


def sh(cmd, env, check=True, timeout=60):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    out = r.stdout.decode(errors="replace")
    if check and r.returncode != 0:
        raise ct.Failure(f"{' '.join(cmd)} failed ({r.returncode}):\n{out}")
    return r.returncode, out


def job_state(jobid, env):
    _, out = sh(["scontrol", "show", "job", str(jobid)], env, check=False)
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def steps_done(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if '"loss":' in line)
    except FileNotFoundError:
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--longtune", required=True)
    p.add_argument("--repo", required=True, help="the longtune checkout (jobs/, slurm/)")
    p.add_argument("--workdir", required=True, help="cluster, runs and logs go here (recreated)")
    p.add_argument("--mpirun", default=shutil.which("mpirun") or "mpirun")
    p.add_argument("--budget", type=float, default=170)
    p.add_argument("--ctld-port", default="16827")
    args = p.parse_args()
    args.longtune, args.repo = os.path.abspath(args.longtune), os.path.abspath(args.repo)
    t0 = time.monotonic()
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cluster = os.path.join(work, "cluster")
    env = dict(os.environ, LONGTUNE_SLURM_CTLD_PORT=args.ctld_port,
               LONGTUNE_SLURM_SLURMD_PORT=str(int(args.ctld_port) + 1),
               SLURM_CONF=os.path.join(cluster, "slurm.conf"))
    start = os.path.join(args.repo, "slurm", "local-cluster", "start.sh")
    stop = os.path.join(args.repo, "slurm", "local-cluster", "stop.sh")
    rc, out = sh([start, cluster], env, check=False)
    if rc != 0:
        log(f"SKIP: the local Slurm cluster did not start (exit {rc}):\n{out}")
        sh([stop, cluster], env, check=False)
        return SKIP
    log(out.strip().splitlines()[-1])
    try:
        return run(args, env, work, t0)
    finally:
        sh([stop, cluster], env, check=False)


def run(args, env, work, t0):
    # (a) the uninterrupted reference: the same recipe under mpirun.
    ref_dir = os.path.join(work, "reference")
    ref_env = dict(ct.environment(), OMP_NUM_THREADS="1")
    r = subprocess.run([args.mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none", args.longtune, "train",
                        "--config", os.path.join(args.repo, "jobs", "cpu-smoke.cfg"), "--run-dir", ref_dir],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ref_env, timeout=120)
    if r.returncode != 0:
        raise ct.Failure(f"reference run failed ({r.returncode}):\n{r.stdout.decode(errors='replace')}")
    ct.export(args, ref_dir, os.path.join(work, "reference-export"))
    log(f"reference run exported ({time.monotonic() - t0:.1f} s)")

    # (b) the job, signalled after a few steps.
    run_dir = os.path.join(work, "run")
    out_file = os.path.join(work, "job.out")
    job_env = dict(env, LONGTUNE_REPO=args.repo, LONGTUNE_BIN=args.longtune, LONGTUNE_RUN_DIR=run_dir)
    _, out = sh(["sbatch", "--parsable", "--export=ALL", f"--output={out_file}", f"--chdir={work}",
                 os.path.join(args.repo, "jobs", "cpu-smoke.slurm")], job_env)
    jobid = out.strip().split(";")[0]
    log(f"submitted job {jobid}")

    def text():
        try:
            with open(out_file, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(cond, what):
        n = 0
        while not cond():
            if time.monotonic() - t0 > args.budget:
                raise ct.Failure(f"timed out waiting for {what} (job state {job_state(jobid, env)}):\n{text()}")
            n += 1
            if n % 50 == 0:
                # A job that can never start stays pending forever: fail at once, with the reason.
                _, show = sh(["scontrol", "show", "job", jobid], env, check=False)
                reason = re.search(r"JobState=PENDING Reason=(\S+)", show)
                if reason and reason.group(1) not in ("None", "Priority", "Resources", "BeginTime"):
                    raise ct.Failure(f"job {jobid} pending for reason {reason.group(1)}:\n{show}")
            if n % 10 == 0 and job_state(jobid, env) in TERMINAL and not cond():
                raise ct.Failure(f"job {jobid} ended {job_state(jobid, env)} while waiting for {what}:\n{text()}")
            time.sleep(0.1)

    wait_for(lambda: steps_done(run_dir) >= 3, "step 3")
    at = steps_done(run_dir)
    sh(["scancel", "--signal=USR1", "--batch", jobid], env)
    log(f"scancel --signal=USR1 --batch {jobid} after step {at} ({time.monotonic() - t0:.1f} s)")
    stopped = re.compile(r"\[train\] signal SIGUSR1: checkpointing step (\d+) and exiting for requeue")
    wait_for(lambda: "requeueing job" in text(), "the requeue")
    m = stopped.search(text())
    if not m:
        raise ct.Failure(f"no '[train] signal SIGUSR1: checkpointing step N' line:\n{text()}")
    stop_step = int(m.group(1))
    if stop_step >= 24:
        raise ct.Failure(f"stopped at step {stop_step}: the signal came too late to test anything")
    log(f"every rank checkpointed step {stop_step} and exited 75; job requeued ({time.monotonic() - t0:.1f} s)")
    wait_for(lambda: job_state(jobid, env) in TERMINAL, "the requeued job to end")
    state = job_state(jobid, env)
    t = text()
    if state != "COMPLETED":
        raise ct.Failure(f"job {jobid} ended {state}:\n{t}")
    resumed = ct.RESUMED.search(t)
    if not resumed or int(resumed.group(2)) != stop_step:
        raise ct.Failure(f"the requeued job did not resume at step {stop_step}:\n{t}")
    if "restart 1" not in t or "[train] done" not in t:
        raise ct.Failure(f"the job did not run again to its end:\n{t}")
    log(f"requeued job resumed at step {stop_step} and completed ({time.monotonic() - t0:.1f} s)")
    out = os.path.join(work, "run-export")
    ct.export(args, run_dir, out)
    n, nbytes = ct.compare_exports(os.path.join(work, "reference-export"), out)
    log(f"export byte-identical to the reference ({n} tensors, {nbytes} bytes)")
    log(f"PASS in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ct.Failure as e:
        log(f"FAIL: {e}")
        sys.exit(1)
