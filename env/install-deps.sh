#!/usr/bin/env bash
# Installs every longtune dependency on Debian 12 / Ubuntu 22.04+ and builds a threaded
# (OpenMP) Kokkos into a local prefix. Idempotent: a second run only checks and exits.
#
#   env/install-deps.sh [--prefix DIR]     (default DIR: <repo>/.deps)
#
# Why Kokkos is built here: Debian only ships Trilinos' Kokkos 3.4.1 with the Serial backend
# and a broken CMake target. The same Kokkos sources, from Debian's trilinos *source* package,
# build a standalone OpenMP Kokkos in ~20 s.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${repo_root}/.deps"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument '$1' (expected --prefix DIR)" >&2; exit 2 ;;
  esac
done

SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi

packages=(
  build-essential cmake ninja-build pkg-config git dpkg-dev
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libboost-program-options-dev
  libnuma-dev numactl
  libxxhash-dev
  libgtest-dev
  nlohmann-json3-dev
  python3
  python3-matplotlib
  # Slurm for the one-machine test cluster (slurm/local-cluster, docs/slurm.md); srun --mpi=pmix
  # needs Slurm's PMIx plugin (in slurm-wlm) and libpmix2. The packages' system services are not
  # used: start.sh runs private daemons.
  slurm-wlm munge libpmix2
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "[install-deps] installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[install-deps] Debian/Ubuntu packages: all present"
fi

# ---- Kokkos (OpenMP backend) into $prefix/kokkos -------------------------------------------
kokkos_prefix="${prefix}/kokkos"
stamp="${kokkos_prefix}/.longtune-built"
if [[ -f "$stamp" ]]; then
  echo "[install-deps] Kokkos: present in ${kokkos_prefix}"
  exit 0
fi

# apt-get source needs a deb-src entry for the mirror the machine already uses.
enable_deb_src() {
  if apt-get source --dry-run trilinos >/dev/null 2>&1; then return 0; fi
  local list=/etc/apt/sources.list.d/longtune-deb-src
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    # deb822 format (Debian 12): copy the stanzas with Types: deb-src
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | $SUDO tee "${list}.sources" >/dev/null
  elif [[ -f /etc/apt/sources.list.d/ubuntu.sources ]]; then
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/ubuntu.sources | $SUDO tee "${list}.sources" >/dev/null
  else
    grep -E '^deb ' /etc/apt/sources.list | sed -e 's/^deb /deb-src /' | $SUDO tee "${list}.list" >/dev/null
  fi
  $SUDO apt-get update -qq
}

work="$(mktemp -d "${TMPDIR:-/tmp}/longtune-kokkos.XXXXXX")"
trap 'rm -rf "$work"' EXIT
enable_deb_src
echo "[install-deps] fetching Debian's trilinos source package (for packages/kokkos)"
( cd "$work" && apt-get source --download-only -qq trilinos >/dev/null )
orig="$(ls "$work"/trilinos_*.orig.tar.* | head -n1)"
# Only the Kokkos folder is needed; extracting just it keeps this fast.
tar -xf "$orig" -C "$work" --wildcards '*/packages/kokkos/*'
src="$(find "$work" -maxdepth 3 -type d -path '*/packages/kokkos' | head -n1)"
[[ -n "$src" ]] || { echo "[install-deps] packages/kokkos not found in $orig" >&2; exit 1; }

echo "[install-deps] building Kokkos (OpenMP) from ${src}"
cmake -S "$src" -B "$work/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$kokkos_prefix" \
  -DCMAKE_CXX_STANDARD=17 \
  -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DBUILD_SHARED_LIBS=ON \
  -DKokkos_ENABLE_OPENMP=ON \
  -DKokkos_ENABLE_SERIAL=ON \
  -DKokkos_ENABLE_TESTS=OFF >"$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j"$(nproc)" >"$work/build.log" 2>&1 || { tail -50 "$work/build.log" >&2; exit 1; }
cmake --install "$work/build" >/dev/null
touch "$stamp"
echo "[install-deps] Kokkos installed in ${kokkos_prefix}"
