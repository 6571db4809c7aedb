#!/usr/bin/env bash
# Stops the cluster that slurm/local-cluster/start.sh started in DIR (default /tmp/longtune-slurm):
# each daemon by the pid in its own pid file, never by name (other Slurm or munge daemons on the
# machine are left alone). Keeps DIR (logs) for inspection; start.sh removes it.
set -uo pipefail
dir="${1:-${LONGTUNE_SLURM_DIR:-/tmp/longtune-slurm}}"
[[ -d "$dir" ]] || exit 0
export SLURM_CONF="$dir/slurm.conf"
# Jobs first, so that no step is left running under a dying slurmd.
if [[ -f "$dir/slurm.conf" ]] && command -v scancel >/dev/null 2>&1; then
  scancel --full --signal=KILL -u "$(id -un)" >/dev/null 2>&1 || true
fi
stop_pid_file() {  # name pidfile
  local pidfile="$2" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "[local-slurm] $1 (pid $pid) ignores SIGTERM; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
}
stop_pid_file slurmd "$dir/run/slurmd.pid"
stop_pid_file slurmctld "$dir/run/slurmctld.pid"
stop_pid_file munged "$dir/munge/munged.pid"
echo "[local-slurm] stopped ($dir kept for its logs)"
