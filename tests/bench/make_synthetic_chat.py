#!/usr/bin/env python3
"""A large synthetic LongCite-style chat JSONL for benchmarking `longtune prepare`.

    python3 tests/bench/make_synthetic_chat.py --out /tmp/synthetic_chat.jsonl --gb 2

Each line: a system prompt, a user turn holding a long "document" (4-64 KB of Zipf-distributed
words, numbers, punctuation and some non-English text) and a question, and an assistant answer with
citation markers; one line in ten has a second user/assistant exchange. Seeded: the same arguments
give the same file. Standard library only.
"""
import argparse
import json
import os
import random

WORDS_EN = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
            "have an they you were her she there been one all we their has would when if so no will what can "
            "model context training citation document evidence answer question long sequence attention memory "
            "researchers reported significant results dataset benchmark performance improvement analysis").split()
WORDS_OTHER = ("Größe Übung schön Straße für über ещё булок Привет мир 我们 今天 公园 机器学习 数据 東京 日本 "
               "ひらがな カタカナ مرحبا بالعالم नमस्ते दुनिया Καλημέρα 안녕하세요 café naïve résumé").split()
PUNCT = [",", ".", ";", ":", "!", "?", " -", " (", ")", "\"", "'s", "n't"]


def make_text(rng, n_words, vocab, weights):
    out = []
    for w in rng.choices(vocab, weights=weights, k=n_words):
        r = rng.random()
        if r < 0.04:
            out.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        elif r < 0.12:
            out.append(w + rng.choice(PUNCT))
        elif r < 0.13:
            out.append(w + "\n\n")
            continue
        else:
            out.append(w)
        out.append(" ")
    return "".join(out).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # A Zipf-like vocabulary: English words, their variants, some other scripts.
    vocab = WORDS_EN + [w.capitalize() for w in WORDS_EN] + WORDS_OTHER
    vocab += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 11))) for _ in range(5000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    # Precomputed pieces are recombined so writing GBs stays fast.
    docs = [make_text(rng, rng.randint(800, 10000), vocab, weights) for _ in range(64)]
    answers = [make_text(rng, rng.randint(40, 400), vocab, weights) for _ in range(256)]
    questions = [make_text(rng, rng.randint(8, 40), vocab, weights) + "?" for _ in range(256)]
    target = int(args.gb * 1e9)
    written = lines = 0
    with open(args.out, "w", encoding="utf-8") as f:
        while written < target:
            doc = rng.choice(docs)
            cut = rng.randint(0, len(doc) // 2)
            msgs = [{"role": "system", "content": "Answer from the document and cite the sentences you use."},
                    {"role": "user", "content": "Document:\n" + doc[cut:] + "\n\nQuestion: " + rng.choice(questions)},
                    {"role": "assistant", "content": rng.choice(answers) + " <cite>[%d-%d]</cite>"
                     % (rng.randint(0, 50), rng.randint(51, 99))}]
            if rng.random() < 0.1:
                msgs += [{"role": "user", "content": rng.choice(questions)},
                         {"role": "assistant", "content": rng.choice(answers)}]
            line = json.dumps({"messages": msgs}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            lines += 1
    print(f"{args.out}: {lines} lines, {written / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
