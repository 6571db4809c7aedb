#!/usr/bin/env bash
# Builds build/device (CUDA for sm_90) and gathers what the GPU machine needs into device/
# (git-ignored): the binaries and the shared libraries it lacks (Kokkos, Boost.Program_options).
# On the GPU machine:  LD_LIBRARY_PATH=device/lib LONGTUNE_FIXTURE_DIR=$PWD/tests/fixtures device/bin/longtune_tests
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
env/build.sh device
rm -rf device && mkdir -p device/bin device/lib
cp build/device/bin/longtune build/device/bin/longtune_tests device/bin/
cp -P .deps/kokkos/lib*/libkokkos*.so* device/lib/
cp -P /usr/lib/x86_64-linux-gnu/libboost_program_options.so* device/lib/
strip --strip-debug device/bin/* 2>/dev/null || true
du -sh device
