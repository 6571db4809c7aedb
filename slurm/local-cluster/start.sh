#!/usr/bin/env bash
# Starts a one-machine Slurm cluster (munged, slurmctld, slurmd) without touching the system's
# configuration: everything (config, munge key and socket, state, spool, logs) lives under one
# directory, by default /tmp/longtune-slurm, removed and recreated by every start.
#
#   slurm/local-cluster/start.sh [DIR]      then: export SLURM_CONF=DIR/slurm.conf
#   slurm/local-cluster/stop.sh  [DIR]
#
# Environment: LONGTUNE_SLURM_CTLD_PORT / LONGTUNE_SLURM_SLURMD_PORT (default 16817 / 16818, apart
# from a system Slurm's 6817/6818), LONGTUNE_SLURM_CPUS (default: nproc).
# Exit status: 0 when the node is idle and accepts jobs; 77 when Slurm or munge is not installed
# (tests skip); 1 on any other failure (logs under DIR/log).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-${LONGTUNE_SLURM_DIR:-/tmp/longtune-slurm}}"
ctld_port="${LONGTUNE_SLURM_CTLD_PORT:-16817}"
slurmd_port="${LONGTUNE_SLURM_SLURMD_PORT:-16818}"
# nproc honours OMP_NUM_THREADS (set to 1 by the tests): ask it without that.
cpus="${LONGTUNE_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"

for exe in munged mungekey slurmctld slurmd sinfo scontrol; do
  command -v "$exe" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin"
  if ! command -v "$exe" >/dev/null 2>&1; then
    echo "[local-slurm] $exe not found: install slurm-wlm and munge (env/install-deps.sh)" >&2
    exit 77
  fi
done

# A previous cluster in the same directory is stopped first, so that repeated starts are clean.
"$here/stop.sh" "$dir" >/dev/null 2>&1 || true
rm -rf "$dir"
mkdir -p "$dir"/{munge,state,spool,run,log}

host="$(hostname -s)"
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half the machine
user="$(id -un)"

# ---- munge: a private key and socket, daemon as the `munge` user when started as root ------------
munge_user="$user"
if [[ "$(id -u)" == 0 ]] && id munge >/dev/null 2>&1; then munge_user=munge; fi
mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null
# munged insists on execute permission for all on its socket directory, and on no write for others.
chmod 0711 "$dir/munge"
chmod 0400 "$dir/munge/munge.key"
chown -R "$munge_user" "$dir/munge"
munged_args=(--socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key"
             --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log"
             --seed-file="$dir/munge/munged.seed")
if [[ "$munge_user" == munge && "$user" != munge ]]; then
  runuser -u munge -- munged "${munged_args[@]}"
else
  munged "${munged_args[@]}"
fi

# ---- slurm.conf from the template ------------------------------------------------------------------
sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@USER@|$user|g" -e "s|@CPUS@|$cpus|g" \
    -e "s|@MEM_MB@|$mem_mb|g" -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
    "$here/slurm.conf.in" > "$dir/slurm.conf"
# slurmd reads cgroup.conf only with cgroup plugins; an empty one keeps newer versions quiet.
: > "$dir/cgroup.conf"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -f "$dir/slurm.conf" -i     # -i: ignore state files (a fresh cluster every time)
slurmd -f "$dir/slurm.conf"

# ---- wait until the node accepts jobs ----------------------------------------------------------------
for _ in $(seq 1 100); do
  state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
  if [[ "$state" == idle* ]]; then
    echo "[local-slurm] up: node $host ($cpus CPUs) in $dir; export SLURM_CONF=$dir/slurm.conf"
    exit 0
  fi
  sleep 0.2
done
echo "[local-slurm] node did not become idle within 20 s (state '${state:-unknown}'); logs:" >&2
tail -n 20 "$dir"/log/*.log "$dir"/munge/munged.log >&2 || true

exit 1
