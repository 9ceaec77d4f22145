"""Encodes a UTF-8 text file with HF `tokenizers` and writes the ids, space-separated, on one
line: the reference for tokenizer.json files lmforge writes (tests/tokenizer/test_bpe_trainer.cpp)."""
import argparse

import tokenizers

ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--text", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
tok = tokenizers.Tokenizer.from_file(a.tokenizer)
text = open(a.text, encoding="utf-8", newline="").read()  # keep \r\n as it is
ids = tok.encode(text, add_special_tokens=False).ids
with open(a.out, "w") as f:
    f.write(" ".join(map(str, ids)) + "\n")
