#!/usr/bin/env python3
"""PyTorch reference for `longtune bench adamw`: torch.optim.AdamW(fused=True) on the CPU.

Same layout as the C++ benchmark: 4096x4096 fp32 matrices (weight decay 0.1) alternating with
4096-element norms (no decay) until --params parameters, betas (0.9, 0.95), lr 1e-4. For each thread
count (torch.set_num_threads) it times --steps optimizer steps after --warmup untimed ones and prints
the median as params/s and GB/s, counting 28 bytes per parameter (param, exp_avg, exp_avg_sq read and
written, grad read; torch writes no compute-dtype copy). It then times the step followed by the copy
of every parameter into a preallocated bf16 tensor (what ZeRO-Offload sends back to the GPU, and
what longtune's update writes in the same pass): 28 + 6 = 34 bytes per parameter.

    OMP_PROC_BIND=spread OMP_PLACES=cores python3 tests/bench/adamw_torch.py --params 300M --threads 1,2,4,8,16
"""

import argparse
import os
import statistics
import time

import torch


def parse_count(text):
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), None)
    return int(float(text[:-1]) * mult) if mult else int(text)


def shapes(params):
    out, left, k = [], params, 0
    while left > 0:
        if k % 2 == 0:
            n = min(left, 4096 * 4096)
            out.append((n // 4096, 4096) if n % 4096 == 0 else (n,))  # a truncated last matrix stays 1-D
        else:
            n = min(left, 4096)
            out.append((n,))
        left -= n
        k += 1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="300M")
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impl", default="fused", choices=["fused", "foreach", "single"])
    args = ap.parse_args()
    n_params = parse_count(args.params)
    cores = os.cpu_count() or 1
    threads = [t for t in (int(x) for x in args.threads.split(",")) if t <= cores] or [cores]

    torch.manual_seed(0)
    torch.set_num_threads(cores)
    params, grads = [], []
    for i, shape in enumerate(shapes(n_params)):
        p = torch.nn.Parameter(torch.empty(shape, dtype=torch.float32).uniform_(-0.02, 0.02))
        p.grad = torch.empty(shape, dtype=torch.float32).uniform_(-1e-3, 1e-3)
        params.append(p)
    decay = [p for p in params if p.dim() >= 2 or p.numel() > 4096]
    no_decay = [p for p in params if not (p.dim() >= 2 or p.numel() > 4096)]
    total = sum(p.numel() for p in params)
    kw = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single": dict(foreach=False)}[args.impl]
    print(f"torch {torch.__version__} AdamW({args.impl}) CPU: {total} parameters in {len(params)} tensors, "
          f"threads {threads} of {cores} cores, {torch.__config__.parallel_info().splitlines()[0]}", flush=True)

    bf16 = [torch.empty_like(p, dtype=torch.bfloat16) for p in params]

    def step_and_copy(opt):
        opt.step()
        with torch.no_grad():
            for b, p in zip(bf16, params):
                b.copy_(p)

    def timed(fn, opt):
        for _ in range(args.warmup):
            fn(opt)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn(opt)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times)

    rows = []
    for t in threads:
        torch.set_num_threads(t)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **kw)
        med, best = timed(lambda o: o.step(), opt)
        pps = total / med
        cmed, _ = timed(step_and_copy, opt)
        cpps = total / cmed
        rows.append((t, med, pps, cmed, cpps))
        print(f"[RESULT] torch_adamw impl={args.impl} threads={t} params={total} step_ms={med * 1e3:.2f} "
              f"step_min_ms={best * 1e3:.2f} params_per_s={pps:.3e} GB_per_s={pps * 28 / 1e9:.1f} "
              f"bytes_per_param=28 step_bf16_copy_ms={cmed * 1e3:.2f} step_bf16_copy_params_per_s={cpps:.3e}",
              flush=True)
        del opt

    print(f"\n| threads | torch AdamW({args.impl}) step ms | params/s | GB/s (28 B/param) | step + bf16 copy ms "
          "| params/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t, med, pps, cmed, cpps in rows:
        print(f"| {t} | {med * 1e3:.1f} | {pps / 1e9:.2f} G | {pps * 28 / 1e9:.1f} | {cmed * 1e3:.1f} | {cpps / 1e9:.2f} G |")


if __name__ == "__main__":
    main()
