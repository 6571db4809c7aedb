#!/usr/bin/env bash
# Runs one rank bound to the NUMA node of its GPU: CPUs and memory (numactl --cpunodebind
# --membind), so that the pinned host buffers and the CPU optimizer step of ZeRO-Offload stay next
# to the GPU's PCIe root. Used by the job scripts as `srun ... slurm/numa-bind.sh longtune train ...`.
#
# The rank's GPU: the first entry of CUDA_VISIBLE_DEVICES when Slurm (--gpus-per-task,
# --gpu-bind) narrowed it to one device, else the node-local rank (SLURM_LOCALID, or
# OMPI_COMM_WORLD_LOCAL_RANK under mpirun). Its NUMA node: /sys/bus/pci/devices/<bus id>/numa_node,
# the bus id from nvidia-smi. Without a GPU (CPU runs) or when the firmware reports no node (-1):
# local rank modulo the number of NUMA nodes. LONGTUNE_NUMA_NODE=N forces a node,
# LONGTUNE_NUMA_BIND=off disables binding, LONGTUNE_NUMA_MEM=preferred binds memory softly
# (--preferred) instead of strictly. Prints one line per rank when LONGTUNE_NUMA_VERBOSE=1.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "numa-bind.sh: usage: numa-bind.sh COMMAND [ARGS...]" >&2; exit 2; }
if [[ "${LONGTUNE_NUMA_BIND:-on}" == off ]] || ! command -v numactl >/dev/null 2>&1; then exec "$@"; fi

local_rank="${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${LOCAL_RANK:-0}}}"
nodes=( /sys/devices/system/node/node[0-9]* )
num_nodes=${#nodes[@]}
(( num_nodes > 0 )) || exec "$@"   # no NUMA information: nothing to bind to

node="${LONGTUNE_NUMA_NODE:-}"
how="forced"
if [[ -z "$node" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpu="$local_rank"
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    if (( ${#visible[@]} == 1 )); then gpu="${visible[0]}"; else gpu="${visible[$(( local_rank % ${#visible[@]} ))]}"; fi
  fi
  # nvidia-smi prints 00000000:3B:00.0; sysfs names it 0000:3b:00.0.
  bus="$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i "$gpu" 2>/dev/null | head -n1 || true)"
  if [[ -n "$bus" ]]; then
    bus="${bus,,}"
    bus="${bus: -12}"
    if [[ -r "/sys/bus/pci/devices/$bus/numa_node" ]]; then
      n="$(cat "/sys/bus/pci/devices/$bus/numa_node")"
      if [[ "$n" =~ ^[0-9]+$ ]]; then node="$n"; how="GPU $gpu ($bus)"; fi
    fi
  fi
fi
if [[ -z "$node" ]]; then node=$(( local_rank % num_nodes )); how="local rank $local_rank"; fi

mem_opt="--membind=$node"
[[ "${LONGTUNE_NUMA_MEM:-strict}" == preferred ]] && mem_opt="--preferred=$node"
[[ "${LONGTUNE_NUMA_VERBOSE:-0}" == 1 ]] && echo "[numa-bind] local rank $local_rank: NUMA node $node (from $how)" >&2
exec numactl --cpunodebind="$node" "$mem_opt" "$@"
