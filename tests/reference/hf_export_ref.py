"""Reference side of test_hf_export: the tokenizers lmforge exports to the Hugging Face layout,
loaded back with transformers' AutoTokenizer.

  hf_export_ref.py sources --out DIR --assets ../shared/assets/tokenizers
      Writes (once; DIR/sources.json says it is complete and of this VERSION) the source
      tokenizers the assets lack and the documents to encode:
        hf-sp-bpe/tokenizer.json        SentencePiece-style BPE, Prepend + Replace normalizers
        hf-sp-metaspace/tokenizer.json  the same with a Metaspace pre-tokenizer
        hf-gpt2/tokenizer.json          GPT-2 as HF byte-level BPE, with a tokenizer_config.json
                                        that the export must keep
        gpt2-merges/vocab.json, merges.txt
        sentencepiece-bpe/tokenizer.model        Llama 2's options (identity, byte fallback)
        sentencepiece-bpe-plain/tokenizer.model  BPE, identity, SentencePiece's other defaults
                                                 (extra whitespace removed, no byte fallback)
        sentencepiece-unigram/tokenizer.model    SentencePiece's defaults (unigram, nmt_nfkc),
                                                 which the export refuses
        docs.jsonl                      {"name", "text"}: KJV Genesis 1-3, kernel documentation
                                        (English, Chinese, Japanese, Korean), the start of GCIDE,
                                        tokenizer_ref.py's hard cases and special-token texts
  hf_export_ref.py encode --manifest M --out R
      M: {"docs": path, "tokenizers": [{"name", "dir", "modes": [{"mode", "add_special_tokens",
      "split_special_tokens"}]}]}. For each tokenizer, AutoTokenizer.from_pretrained(dir) encodes
      every document in every mode; R gets one line per (tokenizer, mode, document):
      {"name", "mode", "doc", "ids", "decoded"} (decode(ids, skip_special_tokens=False)), after a
      first line {"classes": {name: class of the loaded tokenizer}}.

Everything is built offline from the Debian corpora (bible-kjv, linux-doc, dict-gcide) and the
shared tiktoken assets.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VERSION = 3
LINUX_DOC = "/usr/share/doc/linux-doc/Documentation"
DOC_FILES = ["process/coding-style.rst.gz", "process/howto.rst.gz",
             "translations/zh_CN/process/coding-style.rst.gz", "translations/ja_JP/howto.rst.gz",
             "translations/ko_KR/howto.rst.gz"]
GCIDE = "/usr/share/dictd/gcide.dict.dz"
# The hard case of letters and digits assigned after Unicode 14, which PCRE2 10.42 and Oniguruma
# class differently (docs/formats.md, "Tokenizers"): not what this test is about.
UNICODE_VERSION_CASES = {"unicode-15-16"}


def log(msg):
    print(f"hf_export_ref: {msg}", flush=True)


def documents():
    import tokenizer_ref
    docs = []
    kjv = subprocess.run(["bible", "-f", "Gen1:1-Gen3:24"], capture_output=True,
                         check=True).stdout.decode("utf-8")
    docs += [(f"kjv#{i}", d) for i, d in enumerate(tokenizer_ref.split_documents(kjv))]
    for path in DOC_FILES:
        text = gzip.open(os.path.join(LINUX_DOC, path)).read().decode("utf-8", errors="replace")
        docs += [(f"{path}#{i}", d) for i, d in enumerate(tokenizer_ref.split_documents(text))]
    gcide = gzip.open(GCIDE).read(60_000).decode("utf-8", errors="ignore")
    docs += [(f"gcide#{i}", d) for i, d in enumerate(tokenizer_ref.split_documents(gcide))]
    docs += [(name, text) for name, text in tokenizer_ref.HARD_CASES
             if name not in UNICODE_VERSION_CASES]
    docs += [(f"special-{i}", t) for i, t in enumerate(tokenizer_ref.SPECIAL_TEXTS)]
    return docs


def complete(out):
    stamp = os.path.join(out, "sources.json")
    return os.path.exists(stamp) and json.load(open(stamp)).get("version") == VERSION


def make_sources(final, assets):
    """Builds into a private directory renamed into place, so that tests running at once
    (ctest -j) never see half-written files."""
    if complete(final):
        return
    out = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    build_sources(out, assets)
    if not complete(final):
        shutil.rmtree(final, ignore_errors=True)  # an older version
        try:
            os.rename(out, final)
            return
        except OSError:
            if not complete(final):  # not another process that won the race
                raise
    shutil.rmtree(out)


def build_sources(out, assets):
    import sentencepiece as spm
    import tokenizer_ref
    from tiktoken.load import load_tiktoken_bpe
    t0 = time.time()

    def save(tok, name):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        path = os.path.join(out, name, "tokenizer.json")
        tok.save(path)
        return path

    kjv_lines = tokenizer_ref.kjv_text().splitlines()[:4000]
    vocab, merges = tokenizer_ref.train_sentencepiece_style(kjv_lines)
    for name, metaspace in [("hf-sp-bpe", False), ("hf-sp-metaspace", True)]:
        save(tokenizer_ref.hf_sentencepiece_style(vocab, merges, metaspace), name)

    gpt2 = tokenizer_ref.hf_gpt2(load_tiktoken_bpe(os.path.join(assets, "gpt2.tiktoken")), 50256,
                                 add_prefix_space=False)
    path = save(gpt2, "hf-gpt2")
    with open(os.path.join(out, "hf-gpt2", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
                   "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    tokenizer_ref.write_vocab_merges(path, os.path.join(out, "gpt2-merges"))

    os.makedirs(os.path.join(out, "sentencepiece-bpe"), exist_ok=True)
    tokenizer_ref.train_sentencepiece(kjv_lines,
                                      os.path.join(out, "sentencepiece-bpe", "tokenizer.model"))
    train = os.path.join(out, "train.txt")
    with open(train, "w", encoding="utf-8") as f:
        f.write("\n".join(kjv_lines))
    for name, options in [("sentencepiece-bpe-plain", {"model_type": "bpe",
                                                       "normalization_rule_name": "identity"}),
                          ("sentencepiece-unigram", {"model_type": "unigram"})]:
        os.makedirs(os.path.join(out, name), exist_ok=True)
        spm.SentencePieceTrainer.train(input=train,
                                       model_prefix=os.path.join(out, name, "tokenizer"),
                                       vocab_size=1000, num_threads=2, minloglevel=2, **options)
    os.unlink(train)

    with open(os.path.join(out, "docs.jsonl"), "w", encoding="utf-8") as f:
        for name, text in documents():
            f.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "sources.json"), "w") as f:
        json.dump({"version": VERSION}, f)
    log(f"sources in {out} ({time.time() - t0:.1f}s)")


def encode(manifest_path, out):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer
    manifest = json.load(open(manifest_path))
    texts = [json.loads(line)["text"] for line in open(manifest["docs"], encoding="utf-8")]
    classes, lines = {}, []
    for entry in manifest["tokenizers"]:
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(entry["dir"], local_files_only=True)
        classes[entry["name"]] = type(tok).__name__
        for mode in entry["modes"]:
            for i, text in enumerate(texts):
                ids = tok.encode(text, add_special_tokens=mode["add_special_tokens"],
                                 split_special_tokens=mode["split_special_tokens"])
                decoded = tok.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
                lines.append(json.dumps({"name": entry["name"], "mode": mode["mode"], "doc": i,
                                         "ids": ids, "decoded": decoded}, ensure_ascii=False))
        log(f"{entry['name']}: {type(tok).__name__}, {len(entry['modes'])} modes x "
            f"{len(texts)} documents ({time.time() - t0:.1f}s)")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps({"classes": classes}) + "\n")
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sources")
    s.add_argument("--out", required=True)
    s.add_argument("--assets", required=True)
    e = sub.add_parser("encode")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cmd == "sources":
        make_sources(a.out, a.assets)
    else:
        encode(a.manifest, a.out)


if __name__ == "__main__":
    main()
