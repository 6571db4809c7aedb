#!/usr/bin/env bash
# The signal and requeue glue of the job scripts (docs/slurm.md):
#
#   slurm/train-step.sh LAUNCHER... -- longtune train ARGS...
#   e.g. slurm/train-step.sh srun --mpi=pmix --cpu-bind=none slurm/numa-bind.sh -- longtune train --config X
#
# Runs "LAUNCHER... longtune train ARGS..." in the background and waits for it. SIGUSR1 received
# by this (batch) shell -- `#SBATCH --signal=B:USR1@120` before the time limit,
# `scancel --signal=USR1 --batch JOBID` -- is forwarded to the launcher: srun passes it to every
# task, Open MPI's mpirun forwards SIGUSR1 to every rank. Ranks never see a signal sent only to the
# batch shell otherwise. One signal makes every rank finish its step, checkpoint and exit 75; a
# second one makes them exit at once (76).
# SIGTERM is not forwarded: Slurm sends it to every process of the job at once (time limit,
# scancel, scontrol requeue, preemption), so the ranks already have it, and a forwarded copy would
# be their second signal. (mpirun, unlike srun, would also end the job on SIGTERM.)
#
# Exit status 75 from the step means "checkpointed on request": the job is requeued with
# `scontrol requeue $SLURM_JOB_ID` (needs #SBATCH --requeue), and `--resume auto` (the default)
# continues from that checkpoint when it runs again. Any other status is passed on.
set -uo pipefail

launcher=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher+=("$1"); shift; done
[[ $# -gt 0 ]] || { echo "train-step.sh: usage: train-step.sh LAUNCHER... -- COMMAND..." >&2; exit 2; }
shift

forwarded=0
forward() {
  forwarded=$(( forwarded + 1 ))
  echo "[train-step] $(date +%T) $1 received (#$forwarded): forwarding SIGUSR1 to the training step (pid $pid)"
  kill -USR1 "$pid" 2>/dev/null || echo "[train-step] step already gone"
}

"${launcher[@]}" "$@" &
pid=$!
trap 'forward SIGUSR1' USR1
trap 'echo "[train-step] $(date +%T) SIGTERM received: Slurm signals the step itself, not forwarding"' TERM

# `wait` returns early (128 + signal) when a trapped signal arrives: wait again until the step has
# really ended, then take its own status (bash keeps it for a reaped child).
while :; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if (( rc > 128 )); then
  wait "$pid" 2>/dev/null
  rc2=$?
  [[ $rc2 != 127 ]] && rc=$rc2
fi

if [[ $rc == 75 ]]; then
  restarts="${SLURM_RESTART_COUNT:-0}"
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    echo "[train-step] $(date +%T) step checkpointed on request (exit 75); requeueing job $SLURM_JOB_ID (restarts so far: $restarts)"
    # The requeue ends this job run: Slurm sends SIGTERM to this shell (and scontrol) right away.
    # That is success, not a signal to forward.
    trap 'exit 0' TERM
    trap '' USR1
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    echo "[train-step] scontrol requeue failed (job submitted without --requeue?); resubmit the job to continue" >&2
  else
    echo "[train-step] step checkpointed on request (exit 75); not under Slurm: run again to continue"
  fi
  exit 75
fi
[[ $rc == 76 ]] && echo "[train-step] step stopped at once on a second signal (exit 76); the newest complete checkpoint is kept" >&2
exit "$rc"
