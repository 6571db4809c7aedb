#!/usr/bin/env bash
# Installs dependencies (env/install-deps.sh) and builds longtune.
#   env/build.sh [release|test|asan|device] [extra cmake args...]
#     release  (default) build/release, CUDA for sm_75/80/86/90 when nvcc exists
#     test     build/test: warnings are errors, CUDA for one architecture (sm_90) to stay fast
#     asan     build/asan: AddressSanitizer + UBSan, CPU path only
#     device   build/device: like test, what travels to the GPU machine
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
kind="${1:-release}"
shift || true

env/install-deps.sh >/dev/null

case "$kind" in
  release) args=(-DCMAKE_BUILD_TYPE=Release) ;;
  test|device) args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DLONGTUNE_WERROR=ON -DCMAKE_CUDA_ARCHITECTURES=90) ;;
  asan) args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DLONGTUNE_WERROR=ON -DLONGTUNE_SANITIZE=ON -DLONGTUNE_ENABLE_CUDA=OFF) ;;
  *) echo "env/build.sh: unknown build kind '$kind' (expected release, test, asan or device)" >&2; exit 2 ;;
esac

cmake -S . -B "build/$kind" -G Ninja "${args[@]}" "$@" >/dev/null
cmake --build "build/$kind" -j"$(nproc)"
