#!/usr/bin/env python3
"""Reference numbers for longtune's host AdamW (tests/test_adamw.cpp, suite AdamWTorch).

Runs torch.optim.AdamW (CPU, float32, the default single-tensor implementation) for 5 steps over a
few tensors of different ranks, with weight decay only on the 2-D ones (two param groups),
torch.nn.utils.clip_grad_norm_ before the steps that clip, and writes
tests/fixtures/adamw/torch_adamw.json:

  torch_version, implementation, config {lr, beta1, beta2, eps, weight_decay}
  tensors: [{name, shape, decay, init: [float32 values]}]
  steps:   [{step, lr, clip (max_norm, 0 = no clipping), grads: [[...] per tensor] (before clipping),
             grad_norm (what clip_grad_norm_ returned, or the norm when not clipping),
             params, exp_avg, exp_avg_sq: [[...] per tensor] after the step}]
  fused_vs_default_max_rel: max over tensors/steps of |fused - default| / |default| (information)

Every float is a float32 value written as repr() of its float64 widening (exact round trip).
Only torch is needed:  python3 tests/golden/generate_adamw.py [--out tests/fixtures/adamw]
"""

import argparse
import json
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only

import torch  # noqa: E402

SEED = 20251121
LR = 1e-2
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
# (name, shape): 2-D tensors get weight decay, 1-D ones do not. Sizes are not multiples of 64 so
# the C++ test's flat layout has padding between them.
TENSORS = [("w_a", (8, 16)), ("norm_a", (13,)), ("w_b", (5, 7)), ("bias_b", (40,)), ("w_c", (3, 3))]
# Per step: gradient scale and max_norm (0: no clipping). The total norm of a unit-scale gradient
# here is about 16, so max_norm 4 clips at scales 1 and 3, and step 4 does not clip (max_norm 0).
GRAD_SCALE = [1.0, 3.0, 0.2, 5.0, 0.7]
CLIP = [4.0, 4.0, 4.0, 0.0, 40.0]


def f32_list(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def run(fused, inits, grads):
    params = [torch.nn.Parameter(x.clone()) for x in inits]
    decay = [p for p, (_, shape) in zip(params, TENSORS) if len(shape) >= 2]
    no_decay = [p for p, (_, shape) in zip(params, TENSORS) if len(shape) < 2]
    kw = dict(lr=LR, betas=BETAS, eps=EPS)
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = False
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], **kw
    )
    steps = []
    for s, (step_grads, clip) in enumerate(zip(grads, CLIP)):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        if clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in step_grads])))
        opt.step()
        steps.append(
            dict(
                step=s + 1,
                lr=LR,
                clip=clip,
                grads=[f32_list(g) for g in step_grads],
                grad_norm=norm,
                params=[f32_list(p) for p in params],
                exp_avg=[f32_list(opt.state[p]["exp_avg"]) for p in params],
                exp_avg_sq=[f32_list(opt.state[p]["exp_avg_sq"]) for p in params],
            )
        )
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "adamw"))
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(SEED)
    inits = [torch.randn(shape, generator=gen, dtype=torch.float32) for _, shape in TENSORS]
    grads = [
        [torch.randn(shape, generator=gen, dtype=torch.float32) * scale for _, shape in TENSORS]
        for scale in GRAD_SCALE
    ]
    ref = run(False, inits, grads)
    fused = run(True, inits, grads)
    worst = 0.0
    for a, b in zip(ref, fused):
        for key in ("params", "exp_avg", "exp_avg_sq"):
            for x, y in zip(a[key], b[key]):
                tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
                worst = max(worst, float(torch.linalg.vector_norm(tx - ty) / torch.linalg.vector_norm(tx)))

    out = dict(
        torch_version=torch.__version__,
        implementation="torch.optim.AdamW(foreach=False) on CPU, float32; clip_grad_norm_ before clipped steps",
        config=dict(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY),
        tensors=[
            dict(name=n, shape=list(shape), decay=len(shape) >= 2, init=f32_list(x))
            for (n, shape), x in zip(TENSORS, inits)
        ],
        steps=ref,
        fused_vs_default_max_rel=worst,
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "torch_adamw.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: torch {torch.__version__}, {len(ref)} steps, fused vs default max rel {worst:.3g}")


if __name__ == "__main__":
    main()
