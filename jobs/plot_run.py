#!/usr/bin/env python3
"""Plots a longtune run: its metrics.jsonl to one PNG.

    jobs/plot_run.py --run-dir runs/default [--out runs/default/metrics.png]

Panels against the optimizer step: training loss (and held-out loss), held-out perplexity,
tokens/s, memory (peak RSS; peak VRAM for GPU runs). Records are those of docs/training.md:
step records (`loss`, `tokens_per_s`, `peak_rss_mib`, `peak_vram_gib`, ...) and evaluation records
(`eval_loss`, `eval_perplexity`). A resumed run may hold a step twice: the last record wins.
Missing fields, null values and runs without evaluation leave their curve out. Needs matplotlib
(python3-matplotlib, installed by env/install-deps.sh); no display (Agg backend).
"""
import argparse
import json
import math
import os
import re
import sys

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ImportError:
    sys.exit(f"plot_run.py: needs matplotlib, which {sys.executable} cannot import "
             "(apt install python3-matplotlib, as env/install-deps.sh does, or pip install matplotlib)")

# C++ streams write non-finite doubles as nan / -nan / inf, which JSON does not have.
_NONFINITE = re.compile(r"(?<=[:\[,])\s*(-?)(nan|inf)\b", re.IGNORECASE)


def _fix_nonfinite(line):
    def repl(m):
        if m.group(2).lower() == "nan":
            return "NaN"
        return "-Infinity" if m.group(1) else "Infinity"

    return _NONFINITE.sub(repl, line)


def read_metrics(path):
    """Returns ({step: step record}, {step: eval record}), the last record of each step kept."""
    train, evals = {}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(_fix_nonfinite(line))
            except json.JSONDecodeError as e:
                # A run killed mid-write leaves a partial last line.
                print(f"{path}:{lineno}: skipped, not a JSON record ({e.msg})", file=sys.stderr)
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                print(f"{path}:{lineno}: skipped, no step", file=sys.stderr)
                continue
            step = int(rec["step"])
            if "eval_loss" in rec:
                evals[step] = rec
            if "loss" in rec:
                train[step] = rec
    return train, evals


def series(records, key, transform=None, unless_zero=None):
    """(steps, values) of records[*][key], in step order, leaving out missing/null/non-finite values
    and the records whose field `unless_zero` is 0 (a step without counted targets has no loss)."""
    xs, ys = [], []
    for step in sorted(records):
        if unless_zero is not None and records[step].get(unless_zero) == 0:
            continue
        v = records[step].get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if transform is not None:
            v = transform(v)
        if math.isfinite(v):
            xs.append(step)
            ys.append(v)
    return xs, ys


def empty_panel(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot(run_dir, out):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"plot_run.py: {path}: expected a run's metrics.jsonl, got no such file")
    train, evals = read_metrics(path)
    if not train and not evals:
        sys.exit(f"plot_run.py: {path}: expected step or evaluation records, got none")

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    (ax_loss, ax_ppl), (ax_tps, ax_mem) = axes

    # Training loss (and held-out loss)
    xs, ys = series(train, "loss", unless_zero="targets")
    if xs:
        ax_loss.plot(xs, ys, lw=1, color="tab:blue", label="training loss")
    ex, ey = series(evals, "eval_loss")
    if ex:
        ax_loss.plot(ex, ey, "o-", ms=4, lw=1.5, color="tab:orange", label="held-out loss")
    if xs or ex:
        ax_loss.legend()
    else:
        empty_panel(ax_loss, "no loss records")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("loss")

    # Held-out perplexity (computed from eval_loss when a record lacks eval_perplexity)
    px, py = series(evals, "eval_perplexity")
    if not px:
        px, py = series(evals, "eval_loss", transform=lambda v: math.exp(min(v, 700.0)))
    if px:
        ax_ppl.plot(px, py, "o-", ms=4, color="tab:orange")
        if max(py) / max(min(py), 1e-300) > 50:
            ax_ppl.set_yscale("log")
    else:
        empty_panel(ax_ppl, "no evaluation in this run")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_title("held-out perplexity")

    # Throughput
    tx, ty = series(train, "tokens_per_s", unless_zero="tokens")
    if tx:
        ax_tps.plot(tx, ty, lw=1, color="tab:green")
        ax_tps.set_ylim(0, max(ty) * 1.1 or 1)
    else:
        empty_panel(ax_tps, "no throughput records")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_title("throughput")

    # Memory: host RSS (MiB) and, for GPU runs, device memory (GiB) on a second axis
    mx, my = series(train, "peak_rss_mib")
    vx, vy = series(train, "peak_vram_gib")
    handles = []
    if mx:
        handles += ax_mem.plot(mx, my, lw=1.5, color="tab:purple", label="peak RSS (MiB)")
        ax_mem.set_ylim(0, max(my) * 1.1 or 1)
    ax_mem.set_ylabel("host MiB")
    if vx:
        ax_vram = ax_mem.twinx()
        handles += ax_vram.plot(vx, vy, lw=1.5, color="tab:red", label="peak VRAM (GiB)")
        ax_vram.set_ylabel("device GiB")
        ax_vram.set_ylim(0, max(vy) * 1.1 or 1)
    if handles:
        ax_mem.legend(handles=handles, loc="lower right")
    else:
        empty_panel(ax_mem, "no memory records")
    ax_mem.set_title("memory")

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_tps.set_xlabel("step")
    ax_mem.set_xlabel("step")
    last = max(list(train) + list(evals))
    fig.suptitle(f"{os.path.abspath(run_dir)}: {len(train)} steps recorded (last {last}), {len(evals)} evaluations")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"plot_run.py: wrote {out}")


def main():
    p = argparse.ArgumentParser(description="Plot a longtune run directory's metrics.jsonl to a PNG.")
    p.add_argument("--run-dir", required=True, help="the run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output PNG (default: RUN_DIR/metrics.png)")
    args = p.parse_args()
    plot(args.run_dir, args.out or os.path.join(args.run_dir, "metrics.png"))


if __name__ == "__main__":
    main()
