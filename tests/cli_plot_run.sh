#!/bin/sh
# ctest cli.plot_run: a short CPU run with held-out evaluation, stopped and resumed, then
# jobs/plot_run.py on its run directory; checks the step lines show the latest held-out loss
# (after the resume too) and that the PNG is one.
#   tests/cli_plot_run.sh LONGTUNE REPO_ROOT WORK_DIR
set -eu
LT="$1"; ROOT="$2"; WORK="$3"
FIX="$ROOT/tests/fixtures"
PY=""
for p in python3 /usr/bin/python3; do
  if "$p" -c 'import matplotlib' 2>/dev/null; then PY="$p"; break; fi
done
if [ -z "$PY" ]; then
  echo "SKIP: no python3 that imports matplotlib (env/install-deps.sh installs python3-matplotlib)"
  exit 77
fi
rm -rf "$WORK" && mkdir -p "$WORK"
# The golden tiny Llama on the tiny dataset (its own held-out set here): ~1 s per invocation.
train() {
  "$LT" train --model-dir "$FIX/golden/gqa_untied" --data "$FIX/tiny_dataset.h5" --eval-data "$FIX/tiny_dataset.h5" \
    --seq-len 32 --micro-batch 2 --steps 20 --eval-every 5 --warmup-steps 2 --lr 1e-3 --run-dir "$WORK/run" "$@"
}
train --stop-after 12 | tee "$WORK/first.log"
train | tee "$WORK/resumed.log"
grep -Eq '^step +6/20 .*\| eval loss [0-9.]+ ppl [0-9.]+$' "$WORK/first.log" ||
  { echo "FAIL: no held-out loss on the step line after an evaluation"; exit 1; }
grep -Eq '^step +13/20 .*\| eval loss [0-9.]+ ppl [0-9.]+$' "$WORK/resumed.log" ||
  { echo "FAIL: no held-out loss (from metrics.jsonl) on the first step line after the resume"; exit 1; }
"$PY" "$ROOT/jobs/plot_run.py" --run-dir "$WORK/run"
"$PY" - "$WORK/run/metrics.png" <<'PYEOF'
import sys
path = sys.argv[1]
data = open(path, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG (signature {data[:8]!r})"
assert len(data) > 10_000, f"{path}: {len(data)} bytes, expected a plot of more than 10 kB"
print(f"PNG ok: {path}, {len(data)} bytes")
PYEOF
