#!/usr/bin/env python3
"""Load a longtune export with transformers and compare its logits with longtune's.

    python3 tests/golden/check_export.py EXPORT_DIR [EXPORT_DIR ...] [--batch batch.json] [--tol 1e-5]

Each EXPORT_DIR is a Hugging Face model directory written by longtune (config.json, model.safetensors
or shards) holding also
  longtune_logits.safetensors   "logits" [T, V] (F32 or F64) that longtune computed on the batch with
                                the exported weights, optionally "loss" [1]
  batch.json                    the packed batch (tests/golden/README.md), unless --batch is given.
The directory is loaded with LlamaForCausalLM.from_pretrained in float64 (eager attention), with the
same tooling as generate.py (one forward per segment, positions from 0), and the logits are compared:
||longtune - transformers|| / ||transformers|| <= tol. Loading must report no missing, unexpected or
mis-shaped tensors, and a tied config must give a tied model.

Exit status: 0 every directory matches, 1 a mismatch (or a load problem), 77 torch or transformers
is not installed (the test that calls this skips), 2 bad usage.
"""

import argparse
import json
import os
import sys

SKIP = 77


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="exported model directories")
    ap.add_argument("--batch", help="batch.json to use instead of <dir>/batch.json")
    ap.add_argument("--tol", type=float, default=1e-5, help="bound on the norm-relative logits error")
    args = ap.parse_args()

    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import torch
        import transformers
        from safetensors import safe_open
        from transformers import LlamaForCausalLM
        import generate as G
    except ImportError as e:
        print(f"check_export: SKIP, {e} (needs torch and transformers)")
        return SKIP

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(f"check_export: torch {torch.__version__}, transformers {transformers.__version__}")
    ok = True
    for d in args.dirs:
        name = os.path.basename(os.path.normpath(d))
        with open(args.batch or os.path.join(d, "batch.json")) as f:
            batch = json.load(f)
        cu = batch["cu_seqlens"]
        segments = [(cu[i], cu[i + 1], False) for i in range(len(cu) - 1)]

        model, info = LlamaForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager",
                                                       output_loading_info=True)
        model.eval()
        problems = {k: list(v) for k, v in info.items() if k != "error_msgs" and v}
        problems.update({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
        if model.config.tie_word_embeddings and \
                model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            problems["tied"] = "config ties the embeddings but the loaded model is not tied"
        if problems:
            print(f"check_export: {name}: FAIL loading: {problems}")
            ok = False
            continue

        with torch.no_grad():
            ref = G.segment_logits(model, batch, segments)
        with safe_open(os.path.join(d, "longtune_logits.safetensors"), "pt") as h:
            ours = h.get_tensor("logits").to(torch.float64)
            ours_loss = float(h.get_tensor("loss")[0]) if "loss" in h.keys() else None
        if ours.shape != ref.shape:
            print(f"check_export: {name}: FAIL logits shape {tuple(ours.shape)}, transformers {tuple(ref.shape)}")
            ok = False
            continue
        err = float((ours - ref).norm() / ref.norm())
        maxabs = float((ours - ref).abs().max())
        tgt = torch.tensor(batch["targets"], dtype=torch.long)
        loss = float(torch.nn.functional.cross_entropy(ref, tgt, ignore_index=-1))
        line = f"logits rel {err:.2e} (max |diff| {maxabs:.2e}), transformers loss {loss:.6f}"
        if ours_loss is not None:
            line += f", longtune {ours_loss:.6f} (rel {abs(ours_loss - loss) / abs(loss):.1e})"
        good = err <= args.tol
        print(f"check_export: {name}: {'ok' if good else 'FAIL'}: {line}")
        ok = ok and good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
