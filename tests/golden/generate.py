#!/usr/bin/env python3
"""Golden fixtures for longtune's CPU Llama forward/backward (tests/test_golden.cpp).

Writes tiny random Llama models in Hugging Face format plus float64 reference numbers computed by
transformers. See tests/golden/README.md for the cases and the exact file format.

    python3 tests/golden/generate.py --out tests/fixtures/golden

Needs torch and transformers (numpy and safetensors come with them). Runs on the CPU in float64;
no GPU is used even where one exists.
"""

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only: results must not depend on a GPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
# A document is (length, mask_spec). mask_spec is None (every token is a target) or a list of
# (start, end) ranges of token indices whose loss mask is 0 (e.g. a "prompt").
# A row is a list of items: ("doc", doc_index, start, end) = tokens [start, end) of a document
# (a chunk when the document is longer than seq_len), or ("pad", n).

CASES = [
    dict(
        name="gqa_untied",
        description=(
            "GQA (4 query heads, 2 KV heads), untied lm_head, default RoPE (theta 10000), fp32 weights in one "
            "model.safetensors; 2 rows of 48: five documents of different lengths, loss mask zeroing prompt "
            "parts and a hole, row 1 ends with 9 padding tokens."
        ),
        seed=1001,
        config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        store_dtype=torch.float32,
        max_shard_size=None,
        legacy_config=False,
        embed_std=1.0,
        seq_len=48,
        docs=[
            (20, [(0, 8)]),          # prompt of 8 tokens
            (17, None),
            (11, [(0, 4)]),
            (30, [(0, 10)]),
            (9, [(3, 6)]),           # a hole in the middle
        ],
        rows=[
            [("doc", 0, 0, 20), ("doc", 1, 0, 17), ("doc", 2, 0, 11)],
            [("doc", 3, 0, 30), ("doc", 4, 0, 9), ("pad", 9)],
        ],
    ),
    dict(
        name="mha_tied",
        description=(
            "MHA (4 = 4 KV heads), tied embeddings (no lm_head.weight in the file), bf16 weights, config.json "
            "rewritten to the transformers-4 layout (top-level rope_theta 10000, rope_scaling null, torch_dtype); "
            "3 rows of 32: a document of exactly seq_len, then four documents, no loss mask."
        ),
        seed=2002,
        config=dict(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        store_dtype=torch.bfloat16,
        max_shard_size=None,
        legacy_config=True,
        embed_std=0.35,  # tied: the embedding is also the output projection
        seq_len=32,
        docs=[(32, None), (13, None), (19, None), (25, None), (7, None)],
        rows=[
            [("doc", 0, 0, 32)],
            [("doc", 1, 0, 13), ("doc", 2, 0, 19)],
            [("doc", 3, 0, 25), ("doc", 4, 0, 7)],
        ],
    ),
    dict(
        name="mqa_llama3",
        description=(
            "MQA (4 query heads, 1 KV head), head_dim 16 != hidden 48 / 4 heads, RoPE type llama3 (theta 10000, "
            "factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 32), untied, fp16 "
            "weights saved sharded (model.safetensors.index.json); 2 rows of 48: a document of 80 tokens split "
            "into chunks of 48 and 32 (each its own segment, positions from 0; the target of the chunk's last "
            "token is the next chunk's first token, same document), then a document of 16 with a 5-token prompt."
        ),
        seed=3003,
        config=dict(
            vocab_size=112, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
        ),
        store_dtype=torch.float16,
        max_shard_size="40KB",
        legacy_config=False,
        embed_std=1.0,
        seq_len=48,
        docs=[(80, None), (16, [(0, 5)])],
        rows=[
            [("doc", 0, 0, 48)],
            [("doc", 0, 48, 80), ("doc", 1, 0, 16)],
        ],
    ),
    dict(
        name="gqa_long_docs",
        description=(
            "GQA (4 query heads, 2 KV heads), head_dim 10, rope_theta 100 (large rotations), untied, fp32 weights; "
            "one row of 128 packed with 13 short documents of lengths 1..20 (two of length 1), no padding, "
            "no loss mask."
        ),
        seed=4004,
        config=dict(
            vocab_size=128, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        ),
        store_dtype=torch.float32,
        max_shard_size=None,
        legacy_config=False,
        embed_std=1.0,
        seq_len=128,
        docs=[(n, None) for n in [5, 1, 20, 12, 2, 17, 9, 14, 3, 19, 7, 1, 18]],
        rows=[[("doc", d, 0, n) for d, n in enumerate([5, 1, 20, 12, 2, 17, 9, 14, 3, 19, 7, 1, 18])]],
    ),
    dict(
        name="gqa_hd64_gpu",
        description=(
            "The GPU engine's shape class: GQA (2 query heads, 1 KV head) with head_dim 64 (what the CUDA "
            "attention supports), hidden 128, llama3 RoPE (theta 500000, factor 8, original 64), untied, bf16 "
            "weights; 2 rows of 96: six documents incl. one of length 1, a loss-mask prompt, 5 padding tokens."
        ),
        seed=5005,
        config=dict(
            vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        ),
        store_dtype=torch.bfloat16,
        max_shard_size=None,
        legacy_config=False,
        embed_std=1.0,
        seq_len=96,
        docs=[(70, [(0, 12)]), (1, None), (25, None), (40, None), (33, None), (18, None)],
        rows=[
            [("doc", 0, 0, 70), ("doc", 1, 0, 1), ("doc", 2, 0, 25)],
            [("doc", 3, 0, 40), ("doc", 4, 0, 33), ("doc", 5, 0, 18), ("pad", 5)],
        ],
    ),
]


# --------------------------------------------------------------------------------------------
# Batch construction
# --------------------------------------------------------------------------------------------

def make_documents(case, gen):
    vocab = case["config"]["vocab_size"]
    docs = []
    for length, mask_spec in case["docs"]:
        toks = torch.randint(1, vocab, (length,), generator=gen).tolist()  # 0 is reserved for padding
        mask = [1] * length
        for a, b in mask_spec or []:
            for i in range(a, b):
                mask[i] = 0
        docs.append((toks, mask))
    return docs


def build_batch(case, docs):
    S = case["seq_len"]
    tokens, targets, positions, cu = [], [], [], [0]
    segments = []  # (start, end, is_pad)
    for row in case["rows"]:
        row_len = 0
        for item in row:
            if item[0] == "pad":
                n = item[1]
                seg_tok, seg_tgt = [0] * n, [-1] * n
                is_pad = True
            else:
                _, d, a, b = item
                toks, mask = docs[d]
                assert 0 <= a < b <= len(toks)
                seg_tok = toks[a:b]
                seg_tgt = [toks[j + 1] if (j + 1 < len(toks) and mask[j + 1] == 1) else -1 for j in range(a, b)]
                is_pad = False
            start = len(tokens)
            tokens += seg_tok
            targets += seg_tgt
            positions += list(range(len(seg_tok)))
            cu.append(len(tokens))
            segments.append((start, len(tokens), is_pad))
            row_len += len(seg_tok)
        assert row_len == S, f"{case['name']}: row has {row_len} tokens, seq_len {S}"
    R = len(case["rows"])
    assert len(tokens) == R * S
    # every row boundary is a segment boundary
    assert all(r * S in cu for r in range(R + 1))
    batch = {
        "description": case["description"],
        "rows": R,
        "seq_len": S,
        "tokens": tokens,
        "targets": targets,
        "positions": positions,
        "cu_seqlens": cu,
    }
    return batch, segments


# --------------------------------------------------------------------------------------------
# Model creation and loading
# --------------------------------------------------------------------------------------------

def init_weights(model, gen, embed_std):
    """Non-trivial init: attention scores O(1), norms != 1, logits clearly non-uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                v = torch.randn(p.shape, generator=gen, dtype=F64) * embed_std
            elif name.endswith("norm.weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=F64)
            elif name == "lm_head.weight":
                v = torch.randn(p.shape, generator=gen, dtype=F64) * (1.5 / math.sqrt(p.shape[1]))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = torch.randn(p.shape, generator=gen, dtype=F64) * (1.2 / math.sqrt(p.shape[1]))
            elif name.endswith(".weight") and p.dim() == 2:
                v = torch.randn(p.shape, generator=gen, dtype=F64) * (0.8 / math.sqrt(p.shape[1]))
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


def load_model(path, dtype=F64, attn="eager"):
    try:
        m = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        m = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation=attn)
    m.eval()
    for p in m.parameters():
        assert p.dtype == dtype, p.dtype
    return m


def to_legacy_config(path):
    """Rewrite config.json into the transformers-4 layout: top-level rope_theta + rope_scaling."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    cfg["rope_scaling"] = None if rope_type == "default" and set(rp) <= {"rope_type", "type"} else rp
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------

def segment_logits(model, batch, segments):
    """One forward per segment (batch of 1, positions from 0); logits [T, V] in the model dtype."""
    toks = torch.tensor(batch["tokens"], dtype=torch.long)
    outs = []
    for a, b, _ in segments:
        ids = toks[a:b].unsqueeze(0)
        pos = torch.arange(b - a, dtype=torch.long).unsqueeze(0)
        out = model(input_ids=ids, position_ids=pos, use_cache=False)
        outs.append(out.logits[0])
    logits = torch.cat(outs, 0)
    assert logits.shape == (len(batch["tokens"]), model.config.vocab_size)
    return logits


def reference(model, batch, segments):
    model.zero_grad(set_to_none=True)
    logits = segment_logits(model, batch, segments)
    assert logits.dtype == F64
    tgt = torch.tensor(batch["targets"], dtype=torch.long)
    count = int((tgt != -1).sum())
    assert count > 0
    loss = F.cross_entropy(logits, tgt, ignore_index=-1, reduction="sum") / count
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grads[name] = p.grad.detach().to(F64).clone()
    return loss.detach(), logits.detach(), grads, count


def rel(a, b):
    return float((a - b).norm() / b.norm())


def pure_f64_check(path, batch, segments, ref_loss, ref_logits, ref_grads):
    """How far HF's eager path (fp32 RMSNorm and softmax inside a float64 model) is from pure float64."""
    from transformers.models.llama import modeling_llama as ml

    orig = ml.LlamaRMSNorm.forward

    def rms_f64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    ml.LlamaRMSNorm.forward = rms_f64
    try:
        m = load_model(path, attn="sdpa")
        loss, logits, grads, _ = reference(m, batch, segments)
    finally:
        ml.LlamaRMSNorm.forward = orig
    worst = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
    return abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), rel(logits, ref_logits), worst


# --------------------------------------------------------------------------------------------

def check_files(case, path, model):
    files = sorted(os.listdir(path))
    st = [f for f in files if f.endswith(".safetensors")]
    keys = {}
    for f in st:
        with safe_open(os.path.join(path, f), "pt") as h:
            for k in h.keys():
                keys[k] = h.get_slice(k).get_dtype()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(keys) == sorted(names), (sorted(keys), sorted(names))
    want = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[case["store_dtype"]]
    assert all(v == want for v in keys.values()), keys
    if case["config"]["tie_word_embeddings"]:
        assert "lm_head.weight" not in keys
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    if case["max_shard_size"]:
        assert "model.safetensors.index.json" in files and len(st) >= 2, files
    else:
        assert st == ["model.safetensors"], files
    return files, len(st)


def run_case(case, out_dir, work_dir):
    name = case["name"]
    print(f"\n=== {name} ===")
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    cfg = LlamaConfig(max_position_embeddings=256, **copy.deepcopy(case["config"]))
    model = LlamaForCausalLM(cfg)
    init_weights(model, gen, case["embed_std"])
    model = model.to(case["store_dtype"])
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    kw = {"max_shard_size": case["max_shard_size"]} if case["max_shard_size"] else {}
    model.save_pretrained(path, **kw)
    del model

    docs = make_documents(case, gen)
    batch, segments = build_batch(case, docs)

    if case["legacy_config"]:
        before = load_model(path)
        rp_before = copy.deepcopy(before.config.rope_parameters)
        with torch.no_grad():
            lg_before = segment_logits(before, batch, segments)
        to_legacy_config(path)
        after = load_model(path)
        with torch.no_grad():
            lg_after = segment_logits(after, batch, segments)
        rp_after = after.config.rope_parameters
        assert (rp_after.get("rope_type"), float(rp_after["rope_theta"])) == \
            (rp_before.get("rope_type"), float(rp_before["rope_theta"])), (rp_after, rp_before)
        assert torch.equal(lg_before, lg_after), "legacy config.json loads to a different model"
        print(f"legacy config layout: loads to the same model (rope_parameters {after.config.rope_parameters}, "
              f"logits bit-identical)")
        del before, after

    with open(os.path.join(path, "config.json")) as f:
        cfg_json = json.load(f)
    print("config.json:", json.dumps(cfg_json, sort_keys=True))
    contract = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "vocab_size"]
    missing = [k for k in contract if k not in cfg_json]
    rope_keys = [k for k in ("rope_parameters", "rope_theta", "rope_scaling") if k in cfg_json]
    print(f"contract keys missing from config.json (parser must default them): {missing or 'none'}; "
          f"rope keys present: {rope_keys}")

    model = load_model(path)
    files, nshards = check_files(case, path, model)
    rot = model.model.rotary_emb
    inv = getattr(rot, "inv_freq", None)
    print("rotary:", getattr(rot, "rope_type", "?"), "inv_freq",
          None if inv is None else (inv.dtype, [float(x) for x in inv]))

    loss, logits, grads, count = reference(model, batch, segments)
    V = cfg_json["vocab_size"]
    gmax = {k: float(g.abs().max()) for k, g in grads.items()}
    assert all(v > 0 for v in gmax.values()), gmax
    print(f"loss {float(loss):.6f}  ln V {math.log(V):.6f}  counted targets {count} of {len(batch['targets'])}  "
          f"max|grad| {max(gmax.values()):.3e} (smallest per-tensor max {min(gmax.values()):.3e} "
          f"{min(gmax, key=gmax.get)})  logits std {float(logits.std()):.3f}")
    assert abs(float(loss) - math.log(V)) > 0.1, "loss too close to ln V: degenerate model"

    # Leakage control: a whole row through one forward (no document masking) must differ.
    with torch.no_grad():
        S = batch["seq_len"]
        toks = torch.tensor(batch["tokens"]).view(batch["rows"], S)
        naive = model(input_ids=toks, position_ids=torch.arange(S).expand(batch["rows"], S), use_cache=False)
        d = float((naive.logits.reshape(-1, V) - logits).abs().max())
    print(f"unsegmented rows vs segmented: max |logit diff| {d:.3e}")
    assert d > 1e-2

    extra = {}
    if (cfg_json.get("rope_parameters") or {}).get("rope_type") == "llama3":
        alt = os.path.join(work_dir, name + "_default_rope")
        shutil.rmtree(alt, ignore_errors=True)
        shutil.copytree(path, alt)
        c = dict(cfg_json)
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg_json["rope_parameters"]["rope_theta"]}
        with open(os.path.join(alt, "config.json"), "w") as f:
            json.dump(c, f)
        m2 = load_model(alt)
        assert getattr(m2.model.rotary_emb, "rope_type", "default") == "default"
        with torch.no_grad():
            lg2 = segment_logits(m2, batch, segments)
        dmax, drel = float((lg2 - logits).abs().max()), rel(lg2, logits)
        print(f"llama3 vs default rope: max |logit diff| {dmax:.4f}, relative norm diff {drel:.3e}")
        assert dmax > 0.1 and drel > 1e-2, "llama3 scaling does not change the result enough"
        extra["llama3_vs_default"] = (dmax, drel)

    pl, plg, pg = pure_f64_check(path, batch, segments, loss, logits, grads)
    print(f"HF eager (fp32 RMSNorm/softmax inside) vs pure float64: loss rel {pl:.1e}, logits rel {plg:.1e}, "
          f"worst grad rel {pg:.1e}")

    tensors = {"loss": loss.reshape(1).contiguous(), "logits": logits.contiguous()}
    for k, g in grads.items():
        tensors["grad/" + k] = g.contiguous()
    save_file(tensors, os.path.join(path, "reference.safetensors"))
    with open(os.path.join(path, "batch.json"), "w") as f:
        json.dump(batch, f)
        f.write("\n")

    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"files: {sorted(os.listdir(path))} ({nshards} weight file(s)), {size / 1024:.1f} KiB")
    return dict(name=name, loss=float(loss), lnV=math.log(V), count=count, size=size, **extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures/golden")
    ap.add_argument("--only", nargs="*", help="case names to (re)generate")
    args = ap.parse_args()

    torch.set_default_dtype(torch.float32)
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    versions = (f"python {platform.python_version()}\ntorch {torch.__version__}\n"
                f"transformers {transformers.__version__}\n")
    try:
        import numpy
        import safetensors
        versions += f"safetensors {safetensors.__version__}\nnumpy {numpy.__version__}\n"
    except Exception:  # pragma: no cover
        pass
    print(versions, end="")
    with open(os.path.join(args.out, "VERSIONS.txt"), "w") as f:
        f.write(versions)

    results = []
    with tempfile.TemporaryDirectory() as work:
        for case in CASES:
            if args.only and case["name"] not in args.only:
                continue
            results.append(run_case(case, args.out, work))

    print("\n=== summary ===")
    total = 0
    for r in results:
        total += r["size"]
        print(f"{r['name']:14s} loss {r['loss']:.6f}  ln V {r['lnV']:.6f}  counted {r['count']:4d}  "
              f"{r['size'] / 1024:7.1f} KiB")
        if "llama3_vs_default" in r:
            print(f"{'':14s} llama3 vs default rope: max |logit diff| {r['llama3_vs_default'][0]:.4f}, "
                  f"rel {r['llama3_vs_default'][1]:.3e}")
    print(f"total {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
