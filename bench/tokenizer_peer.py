"""Peer for `lmforge bench tokenizer`: Python tiktoken (Rust core) encode throughput on the same
text, split into the same ~4 KB documents, single thread and its batch API on all threads.
Optionally HF `tokenizers` with a tokenizer.json (--hf)."""
import argparse
import json
import os
import time

import tiktoken
from tiktoken.load import load_tiktoken_bpe


def docs_of(text: bytes):
    out, pos = [], 0
    while pos < len(text):
        end = text.find(b"\n", min(len(text), pos + 4096))
        end = len(text) if end < 0 else end + 1
        out.append(text[pos:end].decode("utf-8", errors="replace"))
        pos = end
    return out


def best_of(repeat, fn):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiktoken", required=True, help="<name>.tiktoken with a sibling <name>.json")
    ap.add_argument("--hf", help="tokenizer.json for HF tokenizers")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("file")
    a = ap.parse_args()
    raw = open(a.file, "rb").read()
    docs = docs_of(raw)
    mb = len(raw) / 1e6
    meta = json.load(open(os.path.splitext(a.tiktoken)[0] + ".json"))
    enc = tiktoken.Encoding("bench", pat_str=meta["pat_str"],
                            mergeable_ranks=load_tiktoken_bpe(a.tiktoken),
                            special_tokens=meta["special_tokens"])
    t1 = best_of(a.repeat, lambda: [enc.encode_ordinary(d) for d in docs])
    tn = best_of(a.repeat, lambda: enc.encode_ordinary_batch(docs, num_threads=os.cpu_count()))
    print(f"tiktoken {tiktoken.__version__} batch ({os.cpu_count()} threads): {mb / tn:.2f} MB/s")
    if a.hf:
        import tokenizers
        tok = tokenizers.Tokenizer.from_file(a.hf)
        th = best_of(a.repeat, lambda: [tok.encode(d, add_special_tokens=False) for d in docs])
        print(f"hf tokenizers {tokenizers.__version__} single thread: {mb / th:.2f} MB/s")
    print(f"tiktoken {tiktoken.__version__} single thread: {mb / t1:.2f} MB/s")


if __name__ == "__main__":
    main()
