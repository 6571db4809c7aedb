#!/usr/bin/env python3
"""Tokenizer fixtures for longtune's C++ tokenizer and `longtune prepare` (tests/test_tokenizer.cpp,
tests/test_prepare.cpp). The Hugging Face `tokenizers` library is the oracle.

    python3 tests/golden/make_tokenizer_fixture.py --out tests/fixtures/tokenizer [--check-tables]

No Llama tokenizer ships offline, so this trains a small byte-level BPE configured exactly like
Llama 3's tokenizer.json (Split pre-tokenizer with Llama 3's regex, behavior isolated; ByteLevel with
add_prefix_space false and use_regex false; ignore_merges; ByteLevel decoder; the Llama 3 special
tokens appended after the learned vocabulary) and writes:

  tokenizer.json   the tokenizer (merges in the [a, b] pair form that tokenizers >= 0.20 writes)
  cases.json       {"texts": [{text | bytes_hex, ids, ids_plain?, decoded}],
                    "decodes": [{ids, text}]}  (ids_plain: specials encoded as text)
  chat_cases.json  {"chat": [{messages, ids, mask}], "text": [{text, ids}], "bos_id", "eos_id", ...}
                   what `longtune prepare` must produce for chat conversations and text documents
  tiny_chat.jsonl  the same conversations as a JSONL file (the CLI tests and the README demo)
  tiny_model/      a random Llama (config.json + bf16 model.safetensors) whose vocab_size is the
                   tokenizer's, so the README's prepare -> train -> export -> eval demo runs

--check-tables compares io/unicode_tables.inc's code point classes (White_Space, L, N) with the
tokenizers library's regex engine on every code point (~20 s).

Needs only `tokenizers` (pip install tokenizers; 0.23.3 made the committed files). Deterministic:
the training corpus, the cases and the model weights are seeded.
"""

import argparse
import json
import os
import random
import re
import struct
import sys

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LEARNED_VOCAB = 2048

# ---------------------------------------------------------------------------------------------
# Text pools: used for the training corpus and for the cases.
# ---------------------------------------------------------------------------------------------
MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see it's what we'd've done; they're here and we've won.",
    "DON'T SHOUT! WE'RE HERE, AREN'T WE? I'LL GO. SHE'D KNOW. IT'S MINE. I'VE SEEN.",
    "Größere Übungen für Äpfel und Öl – schön, dass es heiß ist. Die Straße, der Fußgängerübergang.",
    "Où est la bibliothèque ? C'est l'été, à bientôt ! Ça coûte 3,50 €.",
    "我们今天去公园散步，天气非常好。机器学习模型需要大量的数据。",
    "東京は日本の首都です。ひらがなとカタカナ、漢字を使います。",
    "안녕하세요, 만나서 반갑습니다. 한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك اليوم؟ اللغة العربية جميلة.",
    "नमस्ते दुनिया, आप कैसे हैं? हिंदी भाषा।",
    "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Καλημέρα κόσμε, τι κάνεις;",
    "שלום עולם, מה שלומך?",
    "สวัสดีครับ ยินดีต้อนรับ",
    "Tiếng Việt có dấu: Xin chào thế giới.",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇩🇪 🤖 says hi 😀😀😀 👩🏿‍💻",
    "Numbers: 1234567 3.14159265358979 1,000,000 2024-01-31 ٣٤٥ २०२४ ½ ² ³ Ⅻ 0x1F",
    "def f(x):\n    return x ** 2  # square\n\nfor (int i = 0; i < n; ++i) { a[i] += b[i]; }\n",
    "<html><body class=\"x\">Hi &amp; bye</body></html> {\"key\": [1, 2, 3], \"v\": null}",
    "SELECT * FROM users WHERE age >= 18 AND name LIKE 'A%';",
]

HANDWRITTEN = MULTILINGUAL + [
    "", " ", "  ", "a", "A", "é", "中", "😀", "\n", "\r\n", "\t",
    "hello world", "Hello World", " hello", "hello ", "hello  world", "hello\tworld",
    "  leading spaces", "trailing spaces   ", "\t\ttabs\tinside\t", "a\r\nb\r\nc\r\n", "\n\n\n",
    "   \n  \n", "line1\nline2\n\nline4", "x\r\n\r\n  y", "mixed \t \n \r\n end", "a \n", "  \n\t x",
    "\u00a0nbsp\u00a0\u3000ideographic space\u3000", "line\u2028separator\u2029para", "\x0b\x0c vt ff",
    "\x85NEL\x85", "\u1680ogham", "\u202fnarrow\u205f", " \u00a0 x", "\x1c\x1d\x1e\x1f info separators",
    "'s 'S 'T 'RE 'Ve 'M 'LL 'D 'x", "DON'T", "I'M", "it's", "It'S", "'ſ and 'ſt", "o'clock", "rock'n'roll",
    "'", "''", "'''s", "can't won't shouldn't", "We'RE", "y'all", "’s curly apostrophe",
    "1", "12", "123", "1234", "1234567", "12345678901234567890", "1" * 100, "3.14", "-42", "+1e-10",
    "٣٤٥٦", "२०२४", "½¼¾", "²³", "ⅠⅡⅢⅫ", "①②③", "１２３ full width", "a1b2c3", "abc123def", "x²",
    "e\u0301 combining", "n\u0303", "\u200bzero\u200bwidth", "\ufeffBOM", "\x00\x01\x7f ctrl", "\u00ad soft hyphen",
    "👍", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇩🇪🇫🇷", "a😀b", " 😀 ", "😀😀😀😀😀", "🧑🏾‍🚀 astronaut",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters", "𐍈 gothic", "𓀀 hieroglyph", "\U000f0000 private use plane 15",
    "CamelCaseIdentifier", "snake_case_identifier", "kebab-case-id", "path/to/file.txt", "C:\\Windows\\system32",
    "https://example.com/a?b=c&d=e#frag", "user@example.com", "$100.00", "50% off!!!", "...", "?!?!",
    "#include <vector>\nint main() { return 0; }\n", "    indented\n        more\n",
    "x = [i**2 for i in range(10) if i % 2]", "if (a && b || !c) {}", "// comment\n/* block */",
    "<|begin_of_text|>Hello<|eot_id|>", "a<|start_header_id|>user<|end_header_id|>\n\nhi",
    "<|eot_id|><|eot_id|>", "<|eot_id", "<|unknown|>", "<|begin_of_text|>", "x <|end_of_text|> y",
    " <|eot_id|> ", "<|start_header_id|>assistant<|end_header_id|>\n\nOK.<|eot_id|>",
    "<<|eot_id|>>", "<|eot_id|>text<|end_of_text|>",
    "a" * 300, "ab" * 200, "\u4e2d" * 150, " " * 50 + "x", "x" + " " * 50, "\n" * 20 + "x", "-" * 80,
    "aaaa bbbb aaaa bbbb", "the the the the", "Thethethe",
]

INVALID_UTF8 = [
    b"\xff", b"abc\x80def", b"\xe4\xb8", b"\xe4\xb8\xadX", b"\xed\xa0\x80", b"\xed\xbf\xbf ok",
    b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf", b"\xf0\x80\x80\x80",
    b"\xf0\x9f\x98!", b"\xc3", b"\x80\x80\x80", b"\xfe\xfe\xff", b"hello \xf0\x9f\x98\x80 \xf0\x9f world",
    b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xe2\x82\xac\xe2\x82", b"a\xc3\xa9\xc3", b"\xf1\x80\x80",
    b"\xf5\x80\x80\x80", b"Gr\xf6\xdfe latin-1", b"\xc2\x41", b"'\xe2\x80s",
]


def training_corpus():
    rng = random.Random(1)
    lines = []
    stdlib = os.path.dirname(os.__file__)
    for name in sorted(os.listdir(stdlib))[:60]:
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                lines.extend(f.read().splitlines())
    for _ in range(40):
        lines.extend(MULTILINGUAL)
    rng.shuffle(lines)
    return lines


def build_tokenizer():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=LEARNED_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    # Llama 3: the special tokens come after the learned vocabulary.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return tok


def encode(tok, text, specials=True):
    tok.encode_special_tokens = not specials
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def generated_texts(n):
    rng = random.Random(7)
    words = []
    for t in MULTILINGUAL:
        words.extend(re.findall(r"\S+", t))
    seps = [" ", "", "\n", "\t", "  ", "\r\n", ". ", " \n", "\n\n", "   "]
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(k))
        if rng.random() < 0.15:
            text += rng.choice(SPECIALS)
        out.append(text)
    return out


def text_cases(tok):
    cases = []
    texts = HANDWRITTEN + generated_texts(110)
    for text in texts:
        ids = encode(tok, text)
        case = {"text": text, "ids": ids}
        plain = encode(tok, text, specials=False)
        if plain != ids:
            case["ids_plain"] = plain
        decoded = tok.decode(ids, skip_special_tokens=False)
        assert decoded == text, (text, decoded)
        cases.append(case)
    for raw in INVALID_UTF8:
        text = raw.decode("utf-8", errors="replace")
        ids = encode(tok, text)
        cases.append({"bytes_hex": raw.hex(), "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
    return cases


def decode_cases(tok):
    """Id sequences that split multi-byte characters: the decoder replaces the broken bytes."""
    rng = random.Random(3)
    vocab = tok.get_vocab()
    byte_tokens = [vocab[c] for c in sorted(pre_tokenizers.ByteLevel.alphabet())]  # a set: sort for determinism
    out = []
    for _ in range(20):
        ids = [rng.choice(byte_tokens) for _ in range(rng.randint(1, 6))]
        ids += encode(tok, rng.choice(MULTILINGUAL))[: rng.randint(0, 5)]
        out.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False)})
    return out


# ---------------------------------------------------------------------------------------------
# Chat rendering (what `longtune prepare` must produce)
# ---------------------------------------------------------------------------------------------
def render_llama31(messages):
    """The Llama 3.1 chat format as text (content trimmed like the template's `| trim`)."""
    s = "<|begin_of_text|>"
    for m in messages:
        s += "<|start_header_id|>" + m["role"] + "<|end_header_id|>\n\n" + m["content"].strip() + "<|eot_id|>"
    return s


def chat_reference(tok, messages, mask_all=False):
    """ids and loss mask: message by message, content with special-token text encoded as text."""
    sid = tok.token_to_id
    ids, mask = [sid("<|begin_of_text|>")], [0]
    for m in messages:
        head = [sid("<|start_header_id|>")] + encode(tok, m["role"], False) + [sid("<|end_header_id|>")]
        body = encode(tok, "\n\n" + m["content"].strip(), False) + [sid("<|eot_id|>")]
        ids += head + body
        target = 1 if m["role"] == "assistant" else 0
        # "\n\n" is a pre-token of its own (the content starts with a non-space): not a target.
        nl = len(encode(tok, "\n\n", False))
        mask += [0] * len(head) + [0] * nl + [target] * (len(body) - nl)
    if mask_all:
        mask = [1] * len(ids)
    # Without special-token text in the contents this equals tokenizing the rendered template.
    if not any(s in m["content"] for m in messages for s in SPECIALS):
        assert ids == encode(tok, render_llama31(messages)), messages
    return ids, mask


def chat_conversations():
    rng = random.Random(11)
    convs = [
        [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What's 2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "  padded question \n\n"}, {"role": "assistant", "content": "\n\t answer with spaces  "}],
        [{"role": "user", "content": "Zitiere bitte: Größe"}, {"role": "assistant", "content": "„Größe“ [1]."},
         {"role": "user", "content": "Und auf Chinesisch?"}, {"role": "assistant", "content": "大小 [1]。"}],
        [{"role": "system", "content": "Answer with citations."},
         {"role": "user", "content": "Document:\n" + MULTILINGUAL[10] + "\n\nQuestion: what does it say?"},
         {"role": "assistant", "content": "It asks how things are. <cite>[1-2]</cite>"}],
        [{"role": "user", "content": "Say <|eot_id|> literally"}, {"role": "assistant", "content": "<|eot_id|> is a token."}],
        [{"role": "user", "content": "emoji 👨‍👩‍👧‍👦"}, {"role": "assistant", "content": "👍🏽\r\ndone\r\n"}],
        [{"role": "user", "content": "code?"}, {"role": "assistant", "content": MULTILINGUAL[17]}],
    ]
    for _ in range(12):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(MULTILINGUAL)})
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": rng.choice(HANDWRITTEN[:40]).strip() or "?"})
            msgs.append({"role": "assistant", "content": rng.choice(MULTILINGUAL) + " " + rng.choice(MULTILINGUAL)})
        convs.append(msgs)
    return convs


def chat_cases(tok):
    sid = tok.token_to_id
    out = {"bos_id": sid("<|begin_of_text|>"), "eos_id": sid("<|end_of_text|>"),
           "vocab_size": tok.get_vocab_size(with_added_tokens=True), "chat": [], "text": []}
    for msgs in chat_conversations():
        ids, mask = chat_reference(tok, msgs)
        _, mask_all = chat_reference(tok, msgs, mask_all=True)
        assert sum(mask) > 0
        out["chat"].append({"messages": msgs, "ids": ids, "mask": mask})
        assert mask_all == [1] * len(ids)
    for text in MULTILINGUAL[:6] + ["x <|eot_id|> y", "a\n\nb  ", "   "]:
        out["text"].append({"text": text, "ids": [out["bos_id"]] + encode(tok, text, False) + [out["eos_id"]]})
    return out


# ---------------------------------------------------------------------------------------------
# A tiny random Llama with this tokenizer's vocabulary (for the README demo)
# ---------------------------------------------------------------------------------------------
def bf16_bytes(values):
    out = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        out += struct.pack("<H", bits)
    return bytes(out)


def write_tiny_model(path, vocab, bos, eos):
    os.makedirs(path, exist_ok=True)
    H, I, L, NH, KV, HD = 32, 64, 2, 4, 2, 8
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": NH,
           "num_key_value_heads": KV, "head_dim": HD, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024,
           "rope_theta": 500000.0, "rope_scaling": None, "tie_word_embeddings": True, "bos_token_id": bos,
           "eos_token_id": eos, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    rng = random.Random(5)
    tensors = [("model.embed_tokens.weight", [vocab, H])]
    for i in range(L):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [H]), (p + "self_attn.q_proj.weight", [NH * HD, H]),
                    (p + "self_attn.k_proj.weight", [KV * HD, H]), (p + "self_attn.v_proj.weight", [KV * HD, H]),
                    (p + "self_attn.o_proj.weight", [H, NH * HD]), (p + "post_attention_layernorm.weight", [H]),
                    (p + "mlp.gate_proj.weight", [I, H]), (p + "mlp.up_proj.weight", [I, H]),
                    (p + "mlp.down_proj.weight", [H, I])]
    tensors.append(("model.norm.weight", [H]))
    header, blobs, offset = {}, [], 0
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        vals = [1.0] * n if name.endswith("norm.weight") else [rng.gauss(0.0, 0.02) for _ in range(n)]
        blob = bf16_bytes(vals)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


# ---------------------------------------------------------------------------------------------
def check_tables(repo):
    """io/unicode_tables.inc against the tokenizers library's regex engine, every code point."""
    import bisect
    runs = []
    with open(os.path.join(repo, "io", "unicode_tables.inc")) as f:
        for m in re.finditer(r"\{0x([0-9A-F]+), k(\w+)\}", f.read()):
            runs.append((int(m.group(1), 16), m.group(2)))
    starts = [r[0] for r in runs]
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
    sep = "\n\n"

    def same_piece(strings):
        pieces = split.pre_tokenize_str(sep.join(strings))
        ends = [p[1][1] for p in pieces]
        res, pos = [], 0
        for s in strings:
            res.append(bisect.bisect_right(ends, pos) == bisect.bisect_right(ends, pos + 1))
            pos += len(s) + len(sep)
        return res

    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    bad = 0
    for k in range(0, len(cps), 20000):
        chunk = cps[k:k + 20000]
        chars = [chr(c) for c in chunk]
        letter = same_piece(["a" + c for c in chars])    # \p{L}+ continues a letter run
        number = same_piece(["1" + c for c in chars])    # \p{N}{1,3} continues a digit run
        other = same_piece([c + "!" for c in chars])     # [^\s\p{L}\p{N}]+ continues with '!'
        for c, a, b, o in zip(chunk, letter, number, other):
            want = "Letter" if a else "Number" if b else "Other" if (o and c != 0x20) else "White"
            got = runs[bisect.bisect_right(starts, c) - 1][1]
            if want != got:
                bad += 1
                if bad <= 20:
                    print(f"U+{c:04X}: tokenizers says {want}, io/unicode_tables.inc says {got}")
    print(f"check-tables: {bad} code points differ")
    return bad == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/tokenizer")
    ap.add_argument("--check-tables", action="store_true")
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.check_tables and not check_tables(repo):
        sys.exit(1)

    tok = build_tokenizer()
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"), pretty=False)
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))  # what the C++ side reads
    cases = {"tokenizers_version": tokenizers.__version__, "texts": text_cases(tok), "decodes": decode_cases(tok)}
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, separators=(",", ":"))
    chat = chat_cases(tok)
    with open(os.path.join(args.out, "chat_cases.json"), "w", encoding="utf-8") as f:
        json.dump(chat, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(args.out, "tiny_chat.jsonl"), "w", encoding="utf-8") as f:
        for c in chat["chat"]:
            f.write(json.dumps({"messages": c["messages"]}, ensure_ascii=False) + "\n")
    write_tiny_model(os.path.join(args.out, "tiny_model"), chat["vocab_size"], chat["bos_id"],
                     [chat["eos_id"], tok.token_to_id("<|eot_id|>")])
    print(f"{len(cases['texts'])} text cases, {len(cases['decodes'])} decode cases, {len(chat['chat'])} chats, "
          f"vocab {chat['vocab_size']} (tokenizers {tokenizers.__version__})")


if __name__ == "__main__":
    main()
