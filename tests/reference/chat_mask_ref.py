"""Builds small Hugging Face tokenizers whose context crosses special tokens, and encodes
conversations through transformers' apply_chat_template with the assistant-token mask: the
reference for tests/tokenizer/test_chat_template.cpp's ChatTemplate.MasksLikeTransformers.

  chat_mask_ref.py --conversations in.json --out DIR

Writes DIR/<name>/tokenizer.json for each tokenizer below, and DIR/out.json:
{"<name>": {"<format>": [{"ids": [...], "mask": [...]}, ...]}} (mask: transformers'
assistant_masks, from `{% generation %}` blocks around each assistant content and its
end-of-turn token).

  first:  SentencePiece-style BPE, Metaspace prepend_scheme "first" (Mistral v0.3's): no "▁"
          before the text that follows a special token;
  unk:    Metaspace "always", an <unk> and no byte fallback: characters outside the vocabulary
          become <unk>, whose bytes are not the text it stands for;
  strip:  byte-level BPE whose chat specials have lstrip and rstrip: they take the white space
          beside them;
  bytes:  byte-level BPE with GPT-2's regex and plain specials: "\n\n" alone is one token, before
          a word two (the regex's lookahead), so the header encoded alone is not a prefix of the
          header and content encoded together.
"""
import argparse
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}")
LLAMA3 = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}")
CORPUS = ("the user asks and the assistant answers. hello world, the dog sleeps.\n\n\n"
          "system: you are a helpful assistant. what is two plus two? it is four.\n") * 50


def build(name, corpus):
    if name in ("strip", "bytes"):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        if name == "bytes":  # the text whole (a file is read a line at a time): "\n\n" merges
            t.train_from_iterator([open(corpus, encoding="utf-8").read()], trainer)
        else:
            t.train([corpus], trainer)
        strip = name == "strip"
        t.add_special_tokens([AddedToken(s, lstrip=strip, rstrip=strip, normalized=False,
                                         special=True) for s in CHAT_SPECIALS])
    else:
        scheme = "first" if name == "first" else "always"
        t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False, fuse_unk=True))
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                   split=False)
        t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        t.train([corpus], trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"] + CHAT_SPECIALS))
    return t


ap = argparse.ArgumentParser()
ap.add_argument("--conversations", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
conversations = json.load(open(a.conversations, encoding="utf-8"))
os.makedirs(a.out, exist_ok=True)
corpus = os.path.join(a.out, "corpus.txt")
with open(corpus, "w", encoding="utf-8") as f:
    f.write(CORPUS)
out = {}
for name in ("first", "unk", "strip", "bytes"):
    os.makedirs(os.path.join(a.out, name), exist_ok=True)
    path = os.path.join(a.out, name, "tokenizer.json")
    build(name, corpus).save(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>")
    out[name] = {}
    for fmt, template in (("chatml", CHATML), ("llama3", LLAMA3)):
        rows = []
        for c in conversations:
            r = tok.apply_chat_template(c, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
            rows.append({"ids": r["input_ids"], "mask": r["assistant_masks"]})
        out[name][fmt] = rows
json.dump(out, open(os.path.join(a.out, "out.json"), "w", encoding="utf-8"))
