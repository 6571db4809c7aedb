#!/usr/bin/env bash
# Runs every test on a fresh Debian/Ubuntu machine: installs dependencies, builds with warnings
# as errors (CUDA compiled for one architecture), runs the suite, then builds with ASan/UBSan
# and runs the CPU tests again under the sanitizers. GPU tests skip when no GPU is visible.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
start=$(date +%s)

echo "== build (warnings as errors) =="
env/build.sh test
echo "== tests =="
ctest --test-dir build/test --output-on-failure -j"$(nproc)"

echo "== build (ASan + UBSan, CPU path) =="
env/build.sh asan
echo "== tests under sanitizers =="
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan --output-on-failure -j"$(nproc)"

echo "== all tests passed in $(( $(date +%s) - start )) s =="
