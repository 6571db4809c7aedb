#!/usr/bin/env python3
"""End-to-end training golden fixtures for longtune (tests/test_training_golden.cpp).

For existing golden cases (written by generate.py) this runs K full AdamW steps in float64 with
transformers + torch.optim.AdamW on the case's packed batch (the same batch every step), with
gradient clipping and weight decay active, and writes next to the case:

  training.json           hyperparameters (lr, betas, eps, weight_decay, clip, steps) and a summary
  training.safetensors    F64: "param/<name>" after K steps, "loss" [K], "grad_norm" [K]

    python3 tests/golden/generate_training.py --golden tests/fixtures/golden

The models and batches are read from the fixtures, never regenerated. See tests/golden/README.md.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import generate as G  # noqa: E402  (sets CUDA_VISIBLE_DEVICES="" before importing torch)
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

F64 = torch.float64

STEPS = 4
# eps 1e-6 rather than torch's default 1e-8: Adam's step lr * m / (sqrt(v) + eps) has slope up to
# lr / eps in the gradient where |g| ~ eps, so an element whose gradient happens to fall near eps
# turns fp32 rounding noise (~1e-9 absolute) into an error of up to lr * 1e-9 / eps in that element.
# With eps 1e-8, mha_tied has two such elements (step-1 gradients -3.6e-8 and -4.5e-8 in the
# up_proj weights): torch's own fp32 AdamW then misses the float64 result by 2.7e-5 relative per
# tensor, above the test's 1e-5, so the fixture would be ill-conditioned rather than a check of the
# engine. With 1e-6 every fp32 run lands well inside (checked below).
HYPER = dict(lr=3e-3, betas=[0.9, 0.95], eps=1e-6, weight_decay=0.1)
# torch's fp32 run of the same training must stay this far inside the C++ test's 1e-5 bound.
FP32_CONTROL_MAX = 5e-6
# Max global gradient norm per case, chosen between the pre-clip norms of the run so that the
# first steps are clipped and the later ones are not (both branches of the clip coefficient).
CLIP = {
    "gqa_untied": 1.75,
    "mha_tied": 3.0,
    "mqa_llama3": 1.8,
    "gqa_hd64_gpu": 1.6,
}


def load_batch(path):
    with open(os.path.join(path, "batch.json")) as f:
        batch = json.load(f)
    cu = batch["cu_seqlens"]
    segments = [(cu[i], cu[i + 1], False) for i in range(len(cu) - 1)]
    return batch, segments


def make_optimizer(model):
    named = list(model.named_parameters())  # a tied embedding appears once
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=HYPER["lr"], betas=tuple(HYPER["betas"]), eps=HYPER["eps"], foreach=False)


def train(path, clip, dtype=F64):
    """K steps: forward/backward of the mean loss, clip_grad_norm_, AdamW.step. Returns the model,
    the per-step losses (before each update) and pre-clip gradient norms."""
    model = G.load_model(path, dtype=dtype)
    batch, segments = load_batch(path)
    tgt = torch.tensor(batch["targets"], dtype=torch.long)
    count = int((tgt != -1).sum())
    opt = make_optimizer(model)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits = G.segment_logits(model, batch, segments)
        loss = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-1, reduction="sum") / count
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=False)
        opt.step()
        losses.append(float(loss.detach()))
        norms.append(float(norm))
    return model, losses, norms


def rel(a, b):
    return float((a - b).norm() / b.norm())


def run_case(golden, name):
    path = os.path.join(golden, name)
    clip = CLIP[name]
    print(f"\n=== {name} ===")
    init = {n: p.detach().clone() for n, p in G.load_model(path).named_parameters()}
    model, losses, norms = train(path, clip)
    clipped = [n > clip for n in norms]
    print("loss      ", " ".join(f"{x:.6f}" for x in losses))
    print("grad norm ", " ".join(f"{x:.6f}" for x in norms), f"(pre-clip; clip {clip})")
    print("clipped   ", " ".join("yes" if c else "no" for c in clipped))
    assert any(clipped) and not all(clipped), "want both clipped and unclipped steps"
    assert min(abs(n - clip) / clip for n in norms) > 0.01, "a norm is too close to the clip threshold"
    assert all(b < a for a, b in zip(losses, losses[1:])), "loss does not decrease"

    params = {n: p.detach().to(F64).clone() for n, p in model.named_parameters()}
    upd = {n: params[n] - init[n] for n in params}
    assert all(float(u.abs().max()) > 0 for u in upd.values()), "a tensor did not change"
    rel_upd = {n: float(upd[n].norm() / init[n].norm()) for n in params}
    print(f"update / initial (norm ratio): min {min(rel_upd.values()):.2e}, max {max(rel_upd.values()):.2e}")

    # Control: the same training in fp32 torch, the scale of error any fp32 engine is expected to show.
    m32, l32, n32 = train(path, clip, dtype=torch.float32)
    p32 = {n: p.detach().to(F64) for n, p in m32.named_parameters()}
    wp = max(rel(p32[n], params[n]) for n in params)
    wu = max(rel(p32[n] - init[n], upd[n]) for n in params)
    wl = max(abs(a - b) / abs(b) for a, b in zip(l32, losses))
    wn = max(abs(a - b) / abs(b) for a, b in zip(n32, norms))
    print(f"torch fp32 vs float64 after {STEPS} steps: worst param rel {wp:.1e}, worst update rel {wu:.1e}, "
          f"loss rel {wl:.1e}, grad norm rel {wn:.1e}")
    assert wp <= FP32_CONTROL_MAX, "ill-conditioned: an fp32 engine cannot match the float64 parameters to 1e-5"

    tensors = {"loss": torch.tensor(losses, dtype=F64), "grad_norm": torch.tensor(norms, dtype=F64)}
    for n, p in params.items():
        tensors["param/" + n] = p.contiguous()
    save_file(tensors, os.path.join(path, "training.safetensors"))
    meta = dict(
        description=("torch.optim.AdamW (foreach=False; param groups: weight_decay on tensors with >= 2 dims, 0 on "
                     "the rest) after torch.nn.utils.clip_grad_norm_(params, clip) every step; constant lr; the "
                     "batch.json batch every step; loss = sum of CE over counted targets / count; float64."),
        steps=STEPS, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], clip=clip,
        losses=losses, grad_norms=norms, clipped=clipped,
        torch_fp32_control=dict(worst_param_rel=wp, worst_update_rel=wu),
        torch=torch.__version__, transformers=transformers.__version__,
    )
    with open(os.path.join(path, "training.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in ("training.json", "training.safetensors"))
    print(f"wrote training.json, training.safetensors ({size / 1024:.1f} KiB)")
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--golden", required=True, help="the golden fixture folder, e.g. tests/fixtures/golden")
    ap.add_argument("--only", nargs="*", help="case names to (re)generate")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    total = 0
    for name in CLIP:
        if args.only and name not in args.only:
            continue
        total += run_case(args.golden, name)
    print(f"\ntotal {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
