#!/usr/bin/env python3
"""Writes tests/fixtures/tiny_dataset.h5: a small HDF5 token dataset in longtune's format
(docs/formats.md) with a loss mask, for the command-line eval test against the gqa_untied model
(vocab 128). Needs numpy and h5py."""
import argparse

import h5py
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="tests/fixtures/tiny_dataset.h5")
args = ap.parse_args()

rng = np.random.default_rng(7)
lengths = [5, 31, 32, 40, 1, 17, 64, 9]
docs = [rng.integers(3, 128, size=n, dtype=np.int32) for n in lengths]
masks = []
for d in docs:
    m = np.ones(len(d), dtype=np.uint8)
    m[: len(d) // 3] = 0  # a "prompt" third that is not a prediction target
    masks.append(m)
offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
with h5py.File(args.out, "w") as f:
    f.create_dataset("tokens", data=np.concatenate(docs))
    f.create_dataset("doc_offsets", data=offsets)
    f.create_dataset("loss_mask", data=np.concatenate(masks))
    f.attrs["vocab_size"] = np.int64(128)
    f.attrs["bos_id"] = np.int64(1)
    f.attrs["eos_id"] = np.int64(2)
print(f"wrote {args.out}: {len(docs)} documents, {offsets[-1]} tokens")

# ---- Reference eval loss with transformers (optional: needs torch + transformers) ----------
# longtune packs with segments = documents, or seq_len chunks of longer documents, each with
# positions from 0 and isolated attention; a chunk's last token still predicts the next chunk's
# first token. The loss depends only on those segments, so one forward per segment reproduces it.
try:
    import json
    import os

    import torch
    from transformers import LlamaForCausalLM
except ImportError:
    raise SystemExit(0)

SEQ_LEN = 32
model_dir = os.path.join(os.path.dirname(args.out), "golden", "gqa_untied")
model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").to(torch.float64).eval()
total, count = 0.0, 0
with torch.no_grad():
    for d, m in zip(docs, masks):
        n = len(d)
        for start in range(0, n, SEQ_LEN):
            chunk = d[start : start + SEQ_LEN]
            ids = torch.tensor(chunk, dtype=torch.long)[None]
            pos = torch.arange(len(chunk))[None]
            logits = model(input_ids=ids, position_ids=pos).logits[0].to(torch.float64)
            for j in range(len(chunk)):
                i = start + j
                if i + 1 < n and m[i + 1] == 1:
                    total += float(torch.logsumexp(logits[j], 0) - logits[j, d[i + 1]])
                    count += 1
ref = {"model": "golden/gqa_untied", "seq_len": SEQ_LEN, "loss": total / count, "count": count,
       "torch": torch.__version__, "transformers": __import__("transformers").__version__}
with open(args.out.replace(".h5", "_eval.json"), "w") as f:
    json.dump(ref, f, indent=1)
print("reference eval:", ref)
