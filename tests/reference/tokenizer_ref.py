"""Tokenizer reference fixtures: token ids from tiktoken, Hugging Face `tokenizers` and
`sentencepiece` on real corpora and hand-written hard cases, for test_tokenizer_reference.

  tokenizer_ref.py --out build/ref/tokenizers --assets ../shared/assets/tokenizers [--full]

Corpora (Debian packages, read at test time; nothing is committed): the King James Bible
(`bible`, bible-kjv), GCIDE (dict-gcide) and the kernel's .rst documentation (linux-doc), split
into ~4 KB documents at line boundaries (GCIDE's three invalid UTF-8 bytes read as U+FFFD: the
references take str). The default tier takes a fixed sample of ~1.5 MB; --full takes every
document (~68 MB). Both add the hard cases (HARD_CASES, SPECIAL_TEXTS, every assigned code
point), each encoded with and without allow_special. The variants that only change a pattern or
a flag (tiktoken-builtin-*, hf-gpt2-prefix-space) run on a ~250 KB sample in both tiers.

Writes into --out:
  manifest.json          {"tokenizers": [{"name", "path" (the tokenizer file lmforge loads),
                         "fixture", "reference", "docs", "bytes", "unicode14_docs"}], ...}
  <name>.jsonl           one record per document: {"name", "text", "ids", "allow_special",
                         "add_bos"}; "decoded" when the reference's decode(ids) is not the text;
                         "ids_unicode14" where the reference's newer Unicode tables split the
                         text differently from PCRE2 10.42's Unicode 14 (docs/formats.md,
                         "Tokenizers"): the ids it gives with Unicode 14's character classes
  hf-*/tokenizer.json    tokenizer.json files built here (tokenizer_builders.py: GPT-2 and
                         Llama 3 style from the tiktoken ranks, Qwen2's layout with each Unicode
                         normal form; SentencePiece-style BPE trained on part of the KJV)
  gpt2-merges/           vocab.json + merges.txt of hf-gpt2
  sentencepiece-bpe/tokenizer.model   trained with the sentencepiece package
  builtin/<enc>.tiktoken links to the rank files without their .json, so that lmforge uses its
                         built-in pattern; compared with tiktoken's own (tiktoken_ext) patterns

Reference semantics per record: tiktoken encode_ordinary, or encode(allowed_special="all") when
allow_special; HF encode(add_special_tokens=add_bos) with encode_special_tokens = not
allow_special (HF matches added tokens in raw text unless told not to); sentencepiece
encode(add_bos=add_bos) (it never reads control symbols from text).
"""

import argparse
import glob
import gzip
import json
import os
import random
import subprocess
import time
import unicodedata

import regex
import sentencepiece as spm
import tiktoken
import tokenizers
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

from tokenizer_builders import (flagged_token_texts, hf_gpt2, hf_llama3, hf_normalized,
                                hf_sentencepiece_style, load_encoding, train_sentencepiece,
                                train_sentencepiece_style, with_duplicate_merges,
                                with_flagged_added_tokens)

DOC_BYTES = 4096
KJV_TRAIN_LINES = 12000  # the start of Genesis..Judges: training text for the BPE models
LINUX_DOC = "/usr/share/doc/linux-doc/Documentation"
GCIDE = "/usr/share/dictd/gcide.dict.dz"
TIKTOKEN_ENCODINGS = ["gpt2", "cl100k_base", "o200k_base", "llama3"]

# ---------------------------------------------------------------------------------------------
# Documents


def split_documents(text, size=DOC_BYTES):
    """Cuts text into documents of about `size` UTF-8 bytes, at line ends."""
    docs, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line.encode("utf-8"))
        if n >= size:
            docs.append("".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("".join(cur))
    return docs


def kjv_text():
    return subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True,
                          check=True).stdout.decode("utf-8")


def corpora():
    """{corpus: [document]} for the three corpora, in a fixed order."""
    # GCIDE holds three invalid UTF-8 bytes; the references take str, so they become U+FFFD.
    gcide = gzip.open(GCIDE).read().decode("utf-8", errors="replace")
    linux = []
    for path in sorted(glob.glob(os.path.join(LINUX_DOC, "**", "*.rst*"), recursive=True)):
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        linux += split_documents(raw.decode("utf-8", errors="replace"))
    return {"kjv": split_documents(kjv_text()), "gcide": split_documents(gcide),
            "linux-doc": linux}


def sample(docs, n_bytes, seed):
    """A fixed pseudo-random choice of documents worth about n_bytes, in corpus order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= n_bytes:
            break
        chosen.append(i)
        total += len(docs[i].encode("utf-8"))
    return sorted(chosen)


def codepoint_documents(cn14):
    """Every assigned code point (Unicode 14 or newer) outside private use, with the big
    ideograph/syllable blocks thinned to 1 in 37, in runs of 1-6 characters joined by spaces,
    newlines, letters, digits or contractions, so that every character class of every pattern
    meets every kind of neighbour."""
    rng = random.Random(14)
    newer = {ord(c) for c in regex.findall(r"\p{Assigned}", cn14)}
    cps = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        cat = unicodedata.category(chr(cp))
        if cat == "Co" or (cat == "Cn" and cp not in newer):
            continue
        if cat == "Lo" and cp % 37 and cp > 0x2FFF:
            continue
        cps.append(cp)
    seps = [" ", "", "\n", "x", "1", "'s ", "  ", " \u00e9", ". "]
    docs, i = [], 0
    while i < len(cps):
        parts, n = [], 0
        while i < len(cps) and n < 600:
            k = rng.randint(1, 6)
            parts.append("".join(chr(c) for c in cps[i:i + k]) + rng.choice(seps))
            i += k
            n += k
        docs.append("".join(parts))
    return docs


SPECIAL_TEXTS = [
    "Hello<|endoftext|>world",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|> <|endoftext|>\n<|endoftext|>",
    "text before<|endoftext|>",
    "<|endoftext|>text after",
    "partial <|endoftext| and <|endoftex and |>",
    "<|begin_of_text|>System prompt<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi"
    "<|eot_id|><|end_of_text|>",
    "<|reserved_special_token_0|><|reserved_special_token_250|> <|python_tag|>",
    "<|fim_prefix|>def f(x):<|fim_suffix|>    return y<|fim_middle|>",
    "<|endofprompt|>ok",
    "<s>Hello</s> <unk> <s> spaced </s>",
    "</s><s>",
    "a<s>b",
    "a <s> b",
    "<<s>>",
]

HARD_CASES = [
    # Emoji: ZWJ sequences, flags, tag sequences, skin tones, keycaps, variation selectors.
    ("emoji-zwj", "Family: \U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466, "
     "technologist \U0001F469\U0001F3FD\u200D\U0001F4BB, rainbow \U0001F3F3\uFE0F\u200D\U0001F308,"
     " \U0001F9D1\U0001F3FF\u200D\U0001F91D\u200D\U0001F9D1\U0001F3FB heart on fire "
     "\u2764\uFE0F\u200D\U0001F525 and \U0001F636\u200D\U0001F32B\uFE0F."),
    ("emoji-flags", "\U0001F1FA\U0001F1F8\U0001F1EC\U0001F1E7\U0001F1EF\U0001F1F5 "
     "\U0001F1E9\U0001F1EA\U0001F1EB\U0001F1F7 Scotland "
     "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F!"),
    ("emoji-skin", "".join("\U0001F44D" + chr(0x1F3FB + i) for i in range(5)) +
     " \U0001F44B\U0001F3FF\U0001F44B\U0001F3FFwave 1\uFE0F\u20E3 #\uFE0F\u20E3 *\u20E3"),
    ("emoji-run", "\U0001F600" * 300 + "\U0001F4A9\U0001F525" * 100),
    ("emoji-mixed", "Great job!!!\U0001F389\U0001F389 Let's go\U0001F680\U0001F680\U0001F680"
     "...\n\u2728new\u2728 \u263A\uFE0E \u263A\uFE0F"),
    # Combining marks.
    ("combining-nfd", "cafe\u0301 re\u0301sume\u0301 nai\u0308ve Zu\u0308rich "
     "e\u0301\u0301\u0301 a\u0300\u0301\u0302\u0303\u0304\u0305\u0306\u0307\u0308"),
    ("combining-zalgo", "Z\u0337\u0322\u031b\u0358a\u0336\u0321l\u0334\u0350g\u0338\u0352o\u0335 "
     + "x" + "".join(chr(0x300 + i) for i in range(112)) + " y"),
    ("combining-marks-only", "\u0301\u0302\u0303 \u0301 \u20DD\u20DE" * 20),
    ("nfc-nfd", "caf\u00e9 cafe\u0301 \u00c5ngstr\u00f6m A\u030angstro\u0308m \u1e9b\u0323"),
    ("vietnamese", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u: \u0111\u01b0\u1eddng ph\u1ed1, "
     "Nguy\u1ec5n, ng\u01b0\u1eddi."),
    ("devanagari", "\u0939\u093f\u0928\u094d\u0926\u0940 \u092e\u0947\u0902 \u0938\u094d\u0935"
     "\u093e\u0917\u0924 \u0939\u0948\u0964 \u0915\u094d\u0937\u0924\u094d\u0930\u093f\u092f "
     "\u0966\u0967\u0968\u0969"),
    ("hangul", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4. "
     "\u1112\u1161\u11ab\u1100\u1173\u11af (jamo) \u3131\u314f"),
    # Scripts without spaces.
    ("chinese", "\u5929\u5730\u7384\u9ec3\uff0c\u5b87\u5b99\u6d2a\u8352\u3002\u65e5\u6708"
     "\u76c8\u6603\uff0c\u8fb0\u5bbf\u5217\u5f35\u3002\u4e2d\u6587\u6ca1\u6709\u7a7a\u683c"
     "\u3002" * 3),
    ("japanese", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002"
     "\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3001\u6f22\u5b57\uff01"
     "\uff8a\uff9d\uff76\uff78\uff76\uff80\uff76\uff85 \uff11\uff12\uff13"),
    ("thai", "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22\u0e44\u0e21\u0e48\u0e21\u0e35\u0e01"
     "\u0e32\u0e23\u0e40\u0e27\u0e49\u0e19\u0e27\u0e23\u0e23\u0e04\u0e23\u0e30\u0e2b\u0e27\u0e48"
     "\u0e32\u0e07\u0e04\u0e33 \u0e51\u0e52\u0e53"),
    ("lao-khmer-burmese-tibetan", "\u0e9e\u0eb2\u0eaa\u0eb2\u0ea5\u0eb2\u0ea7 "
     "\u1797\u17b6\u179f\u17b6\u1781\u17d2\u1798\u17c2\u179a "
     "\u1019\u103c\u1014\u103a\u1019\u102c\u1018\u102c\u101e\u102c "
     "\u0f56\u0f7c\u0f51\u0f0b\u0f61\u0f72\u0f42\u0f0d"),
    # Right-to-left.
    ("arabic", "\u0627\u0644\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u0651\u064e\u0629 "
     "\u0647\u064a \u0644\u063a\u0629 \u0665\u0666\u0667 \u06f1\u06f2\u06f3 \ufdfd \u0640\u0640"),
    ("hebrew", "\u05e2\u05b4\u05d1\u05b0\u05e8\u05b4\u05d9\u05ea \u05e9\u05c1\u05b8\u05dc"
     "\u05d5\u05b9\u05dd \u200f(\u05de\u05e9\u05e4\u05d8)\u200e mixed English \u05e2\u05d1"
     "\u05e8\u05d9\u05ea 123"),
    # Whitespace.
    ("spaces-1000", " " * 1000),
    ("spaces-1001-x", " " * 1001 + "x"),
    ("x-spaces-2000", "x" + " " * 2000),
    ("tabs-1000", "\t" * 1000 + "end"),
    ("newlines-1000", "\n" * 1000),
    ("crlf-500", "\r\n" * 500 + "x"),
    ("mixed-ws", " \t\n" * 400 + "word" + "\n \t" * 400),
    ("ws-between-words", "a" + " " * 37 + "b\t\t\tc\n\n\n\nd \n e\r\nf\r\rg\u000bh\u000ci"),
    ("unicode-ws", "a\u00a0b\u1680c\u2000d\u2001e\u2002f\u2003g\u2004h\u2005i\u2006j\u2007k"
     "\u2008l\u2009m\u200an\u2028o\u2029p\u202fq\u205fr\u3000s\u0085t\u180eu\u200bv\ufeffw"
     "\u2060x\u001cy\u001dz\u001e\u001f"),
    ("unicode-ws-runs", "x\u3000\u3000\u3000y \u00a0 \u00a0z\u180e\u180e \u180e\n\u0085\u0085"
     "w\u2028\u2028"),
    # U+180E left White_Space in Unicode 6.3; PCRE2's \s still lists it.
    ("mongolian-vowel-separator", "!!\u180e!! ..\u180e.. a\u180e\u180e\u180e\n\u180e\n\n"
     " \u180e \u180e\u180e word\u180eword 1\u180e2 '\u180es x   \u180e \t\t\u180e\n\n\u180e\n\n"),
    ("trailing-ws", "end of text   \n  \t "),
    ("leading-ws", "   \n\t start"),
    # Digits.
    ("digits-1000", "1234567890" * 100),
    ("zeros", "0" * 1000 + " 1" + "0" * 999),
    ("numbers", "3.14159265358979323846 1,000,000.00 -42 +7 1e-10 0xDEADBEEF 2024-01-31 "
     "12:34:56 (555) 123-4567 $1,234.56 99% 1st 2nd 3rd 4th"),
    ("unicode-digits", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669" * 20 +
     " \uff10\uff11\uff12 \u00b2\u00b3\u00b9 \u00bd\u00bc \u2160\u2161\u216b \u2460\u2461 "
     "\U0001D7CE\U0001D7CF \u0967\u0968 \u09e6\u09e7"),
    # Contractions in every case.
    ("contractions-caps", "DON'T I'LL WE'VE YOU'RE HE'D I'M IT'S SHE'S THEY'RE WE'D"),
    ("contractions-mixed", "don't Don't DoN'T dOn'T i'Ll I'lL we'Ve We'vE you'Re YOU'rE "
     "'s 'S 't 'T 're 'RE 've 'VE 'm 'M 'll 'LL 'd 'D"),
    ("contractions-odd", "IT'\u017f it'\u017f rock 'n' roll '''' ''s 's's O'Neil "
     "l'homme \u2019s it\u2019s don\u2019t 'sss 'llama 'DD 'mm"),
    ("apostrophes-digits", "'99 '1 '12345 x'1 '\n's"),
    # Special-token text (as text unless allow_special).
    ("specials-as-text", " ".join(SPECIAL_TEXTS)),
    # Control characters and NUL.
    ("nul", "a\0b\0\0c" + "\0" * 20 + "end"),
    ("controls", "".join(chr(c) for c in range(1, 32)) + "\x7f" +
     "".join(chr(c) for c in range(0x80, 0xA0))),
    ("crlf", "line one\r\nline two\r\n\r\nline four\rline five\r\r\nend"),
    # Long runs without spaces.
    ("long-word", "supercalifragilisticexpialidocious" * 200),
    ("long-letters", "a" * 5000),
    ("base64", "TWFueSBoYW5kcyBtYWtlIGxpZ2h0IHdvcmsu" * 100 + "=="),
    ("punctuation-run", "!?.,;:-_=+*&^%$#@~`|\\/<>[]{}()\"'" * 50),
    ("url-code", "https://example.com/path?q=1&r=%20x#frag\n"
     "def f(x):\n    return x**2  # comment\n\tif (a && b || !c) { y[i] += 1; }\n"),
    # Noncharacters and the edges of the code space.
    ("edges", "\uffff\ufffe\ufffd \U0010ffff\U0010fffe \U000e0001\U000e0020 \U0001d11e "
     "\ue000\uf8ff \U000f0000"),
    # U+0295 moves from Ll to Lo in Unicode 17 (o200k's pattern tells them apart).
    ("u0295", "A\u0295b \u0295A a\u0295 \u0295's \u0295\u0295X Xx\u0295 \u0295"),
    # Letters and digits assigned after Unicode 14 (PCRE2 10.42's tables): Cyrillic (16.0),
    # Kawi (15.0), Nag Mundari letters and digits (15.0), CJK Extension H (15.0), Garay (16.0).
    ("unicode-15-16", "Tje \u1c89\u1c8a test \U00011F04\U00011F05\U00011F06 "
     "\U0001E4D0\U0001E4D1 \U0001E4F0\U0001E4F1\U0001E4F2 x\U00031350\U00031351y "
     "\U00010D50\U00010D51 a\u1c89b 1\U0001E4F3"),
]


def unknown_runs():
    """Runs of characters an English model lacks (CJK, Greek, Hangul), 1 to 100,000 long, next
    to text, spaces, characters NFKC maps to ASCII, combining marks and ideographic spaces; and
    Hangul jamo, unknown alone, that compose into a syllable the model has."""
    rng = random.Random(97)

    def cjk(n):
        return "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(n))
    docs = []
    jamo = "\u1100\u1161"  # 가 as its two jamo (a piece where the model has 가)
    for n in (1, 31, 32, 33, 63, 64, 65, 66, 200, 5000, 100_000):
        docs += [cjk(n), f"In the beginning {cjk(n)} God created",
                 f"word{cjk(n)}\uff57\uff4f\uff52\uff44{cjk(n)}\u0301x{cjk(n)}",
                 f"{cjk(n)}\u3000{cjk(n)} \u00e9\u0301{cjk(n)}\ufb01",
                 f"  {cjk(n)}   {'Ω' * n}{'αβγ' * n}{cjk(n)}\u0301\u1100\u1161{cjk(n)}  ",
                 jamo * n, f"{cjk(n)}{jamo * n}\u1100{cjk(n)}"]
    return [(f"unknown-run-{i}", d) for i, d in enumerate(docs)]


def hard_cases(cn14):
    cases = list(HARD_CASES)
    for i, text in enumerate(codepoint_documents(cn14)):
        cases.append((f"codepoints-{i}", text))
    return cases


# Qwen2's pre-tokenizer pattern (its tokenizer.json's Split regex).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                 r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Text that the Unicode normal forms change: decomposed and precomposed accents, canonical
# reordering of marks, singletons (Angstrom, Ohm, Kelvin signs), Hangul syllables and their jamo,
# composition exclusions, compatibility characters (ligatures, fullwidth, circled, super- and
# subscripts, NBSP and other spaces, Arabic presentation forms whose decomposition is 18
# characters long), and marks after special tokens and spaces.
NORMALIZATION_TEXTS = [
    "Cafe\u0301 cre\u0300me bru\u0302le\u0301e, caf\u00e9 cr\u00e8me br\u00fbl\u00e9e.",
    "A\u030a \u212b \u00c5 \u2126 \u03a9 \u212a K; q\u0323\u0307 q\u0307\u0323 "
    "a\u0301\u0316\u0300 s\u0323\u0307",
    "\u1112\u1161\u11ab\u1100\u1173\u11af \ud55c\uae00 \u1100\u1161 \u1100\u1161\u11a8",
    "\u0958\u0959 \u0915\u093c \u2adc \u2add\u0338 \u0f43 e\u0301\u0301\u0301",
    "\ufb01nance \ufb02ow \uff28\uff45\uff4c\uff4c\uff4f \u2460\u2461 x\u00b2 H\u2082O "
    "\u00bd \u2153 \u2167 \u3392 \u33a1 \u2122 \u00aa\u00ba",
    "no\u00a0break\u2002en\u2003em\u3000ideographic\u202fnarrow \u00a8 \u00b4 \u02dc end",
    "\ufdfa \ufdfb \ufb4f \uff76\uff9e\uff76\uff9f \u30ac \u30ab\u3099 \u2474 \u249c",
    "\u0301 leading mark, \n\u0301 after newline, '\u0301s contraction, 1\u0301 2\u20dd",
    "<|endoftext|>\u0301 mark after a special, e<|endoftext|>\u0301 and \u1100<|endoftext|>\u1161",
    "Vietnamese: Tie\u0302\u0301ng Vie\u0323\u0302t; Greek: \u03b1\u0313\u0301 "
    "\u1f04 \u03ce\u0345; \u00e5ngstr\u00f6m \u01fa",
    "Mixed: Stra\u00dfe \u1e9e \u0130stanbul \u0131 \u017f\u0307 \ufb05 \u2028line\u2029para",
    "\ufdfa" * 40 + " \u3300\u3301\u3302" * 20 + " e" + "\u0301\u0323" * 50,
]


# ---------------------------------------------------------------------------------------------
# Unicode tables: PCRE2 10.42 knows Unicode 14 (as does Python 3.11's unicodedata); tiktoken's
# regex crate and HF's Oniguruma know newer versions. Where they differ, the fixtures also
# record the ids the reference gives with Unicode 14's classes (patterns rewritten so that each
# \p{..} class holds exactly its Unicode 14 members).

PROPERTIES = ["L", "N", "M", "Lu", "Ll", "Lt", "Lm", "Lo"]


def unassigned_in_14():
    """The code points Unicode 14 leaves unassigned (Cn), as one string."""
    return "".join(chr(cp) for cp in range(0x110000)
                   if not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) == "Cn")


def class_candidates():
    """Per class: {code point: member in Unicode 14} where unicodedata (14.0) and the regex
    module's newer tables disagree; the candidates to probe the reference engines with."""
    # unicodedata stands for PCRE2 10.42's tables: both are Unicode 14 (Python 3.11).
    assert unicodedata.unidata_version == "14.0.0", (
        f"unicodedata is Unicode {unicodedata.unidata_version}; the Unicode 14 emulation needs "
        "Python 3.11's 14.0.0 (PCRE2 10.42's version)")
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
    cats = [unicodedata.category(chr(cp)) for cp in cps]
    everything = "".join(map(chr, cps))
    out = {}
    for prop in PROPERTIES:
        newer = {ord(c) for c in regex.findall(r"\p{%s}" % prop, everything)}
        old = {cp for cp, cat in zip(cps, cats) if cat.startswith(prop)}
        out[prop] = {cp: cp in old for cp in newer ^ old}
    return out


def tiktoken_class_members(prop, cps):
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(f"probe-{prop}", pat_str=r"\p{%s}" % prop, mergeable_ranks=ranks,
                            special_tokens={})
    matched = enc.decode(enc.encode_ordinary("".join(chr(c) for c in cps)))
    return {ord(c) for c in matched}


def onig_class_members(prop, cps):
    split = pre_tokenizers.Split(Regex(r"\p{%s}" % prop), behavior="removed")
    rest = "".join(s for s, _ in split.pre_tokenize_str("".join(chr(c) for c in cps)))
    return set(cps) - {ord(c) for c in rest}


def ranges(cps):
    out, cps = [], sorted(cps)
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append((cps[i], cps[j]))
        i = j + 1
    return out


class Unicode14:
    """Per engine ("tiktoken", "onig") and class: the code points the engine puts in \\p{..}
    beyond Unicode 14 (extra) and those Unicode 14 has that it leaves out (missing), and the
    pattern rewrite that gives each class its Unicode 14 members."""

    def __init__(self):
        self.extra = {"tiktoken": {}, "onig": {}}
        self.missing = {"tiktoken": {}, "onig": {}}
        for prop, cand in class_candidates().items():
            for engine, members in (("tiktoken", tiktoken_class_members),
                                    ("onig", onig_class_members)):
                got = members(prop, list(cand)) if cand else set()
                extra = sorted(cp for cp in got if not cand[cp])
                missing = sorted(cp for cp, old in cand.items() if old and cp not in got)
                if extra:
                    self.extra[engine][prop] = extra
                if missing:
                    self.missing[engine][prop] = missing
        self.chars = {e: {chr(c) for d in (self.extra[e], self.missing[e]) for cps in d.values()
                          for c in cps} for e in self.extra}

    def affects(self, engine, text):
        chars = self.chars[engine]
        return bool(chars) and any(c in chars for c in text)

    def rewrite(self, engine, pattern):
        def cls(cps):
            return "".join(r"\x{%X}-\x{%X}" % r for r in ranges(cps))
        for prop in PROPERTIES:
            extra, missing = self.extra[engine].get(prop), self.missing[engine].get(prop)
            sub = r"\p{%s}" % prop
            if extra:
                sub = (r"[%s--[%s]]" % (sub, cls(extra)) if engine == "tiktoken" else
                       r"[%s&&[^%s]]" % (sub, cls(extra)))
            if missing:
                sub = r"[%s[%s]]" % (sub, cls(missing))
            pattern = pattern.replace(r"\p{%s}" % prop, sub)
        return pattern

    def summary(self):
        return {e: {"extra": {p: len(c) for p, c in self.extra[e].items()},
                    "missing": {p: [f"U+{c:04X}" for c in cps]
                                for p, cps in self.missing[e].items()}} for e in self.extra}


# ---------------------------------------------------------------------------------------------
# Records


class Reference:
    """Encodes documents with one reference tokenizer; subclasses per library."""
    has_bos = False

    def encode(self, texts, allow_special, add_bos):  # -> list of id lists
        raise NotImplementedError

    def decode(self, ids_list):
        raise NotImplementedError

    def unicode14(self, texts, allow_special, add_bos):  # -> ids with Unicode 14 classes, or None
        return None

    def affected(self, text):
        return False


class TiktokenRef(Reference):
    engine = "tiktoken"

    def __init__(self, enc, emulated, uni, bos=None):
        self.enc, self.emulated, self.uni, self.bos = enc, emulated, uni, bos
        self.has_bos = bos is not None

    def _encode(self, enc, texts, allow_special, add_bos):
        if allow_special:
            out = enc.encode_batch(texts, allowed_special="all", num_threads=2)
        else:
            out = enc.encode_ordinary_batch(texts, num_threads=2)
        return [[self.bos] + ids for ids in out] if add_bos else out

    def encode(self, texts, allow_special, add_bos):
        return self._encode(self.enc, texts, allow_special, add_bos)

    def decode(self, ids_list):
        return [self.enc.decode(ids) for ids in ids_list]

    def unicode14(self, texts, allow_special, add_bos):
        return self._encode(self.emulated, texts, allow_special, add_bos)

    def affected(self, text):
        return self.uni.affects(self.engine, text)


class HfRef(Reference):
    engine = "onig"

    def __init__(self, tok, emulated=None, uni=None, has_bos=False, emulated_prefix_space=False):
        self.tok, self.emulated, self.uni, self.has_bos = tok, emulated, uni, has_bos
        # The emulation of ByteLevel(add_prefix_space=True) adds the space itself (one segment:
        # affected documents hold no added-token text).
        self.emulated_prefix_space = emulated_prefix_space

    @staticmethod
    def _encode(tok, texts, allow_special, add_bos):
        tok.encode_special_tokens = not allow_special
        try:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add_bos)]
        finally:
            tok.encode_special_tokens = False

    def encode(self, texts, allow_special, add_bos):
        return self._encode(self.tok, texts, allow_special, add_bos)

    def decode(self, ids_list):
        return self.tok.decode_batch(ids_list, skip_special_tokens=False)

    def unicode14(self, texts, allow_special, add_bos):
        if self.emulated_prefix_space:
            assert not any(a.content in t for t in texts for a in
                           self.tok.get_added_tokens_decoder().values())
            texts = [t if t.startswith(" ") else " " + t for t in texts]
        return self._encode(self.emulated, texts, allow_special, add_bos)

    def affected(self, text):
        return self.emulated is not None and self.uni.affects(self.engine, text)


class SentencePieceRef(Reference):
    has_bos = True

    def __init__(self, sp):
        self.sp = sp

    def encode(self, texts, allow_special, add_bos):
        return [self.sp.encode(t, add_bos=add_bos) for t in texts]

    def decode(self, ids_list):
        return [self.sp.decode(ids) for ids in ids_list]


def write_fixture(path, ref, batches):
    """batches: [(names, texts, allow_special, add_bos)]. Returns (docs, bytes, unicode14 docs)."""
    n_docs = n_bytes = n_u14 = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for names, texts, allow_special, add_bos in batches:
            if add_bos and not ref.has_bos:
                continue
            for lo in range(0, len(texts), 512):
                chunk_names, chunk = names[lo:lo + 512], texts[lo:lo + 512]
                ids_list = ref.encode(chunk, allow_special, add_bos)
                decoded = ref.decode(ids_list)
                hit = [i for i, t in enumerate(chunk) if ref.affected(t)]
                u14 = dict(zip(hit, ref.unicode14([chunk[i] for i in hit], allow_special,
                                                  add_bos))) if hit else {}
                # The emulation must change nothing where no affected character is.
                if hit and len(hit) < len(chunk):
                    probe = [i for i in range(len(chunk)) if i not in u14][:8]
                    same = ref.unicode14([chunk[i] for i in probe], allow_special, add_bos)
                    assert same == [ids_list[i] for i in probe], "Unicode 14 emulation drifted"
                for i, (name, text, ids) in enumerate(zip(chunk_names, chunk, ids_list)):
                    rec = {"name": name, "text": text, "ids": ids, "allow_special": allow_special,
                           "add_bos": add_bos}
                    if decoded[i] != text:
                        rec["decoded"] = decoded[i]
                    if i in u14 and u14[i] != ids:
                        rec["ids_unicode14"] = u14[i]
                        n_u14 += 1
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n_docs += 1
                    n_bytes += len(text.encode("utf-8"))
    os.replace(path + ".tmp", path)
    return n_docs, n_bytes, n_u14


# ---------------------------------------------------------------------------------------------


def log(msg):
    print(msg, flush=True)  # progress shows up under ctest too


def make(out, assets, full=False):
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "manifest.json")):  # written last: present = complete
        os.remove(os.path.join(out, "manifest.json"))
    assets = os.path.abspath(assets)
    docs = corpora()
    kjv_lines = kjv_text().splitlines()[:KJV_TRAIN_LINES]
    log(f"tokenizers: corpora read ({time.time() - t0:.1f}s)")

    # Documents: (name, text). The fast tier samples ~1.5 MB; "small" (~250 KB) is for the
    # variants that only change a pattern or a flag (tiktoken-builtin-*, hf-gpt2-prefix-space).
    budget = {"kjv": 400_000, "gcide": 500_000, "linux-doc": 600_000}
    main, small = [], []
    for corpus, ds in docs.items():
        picked = range(len(ds)) if full else sample(ds, budget[corpus], seed=len(corpus))
        main += [(f"{corpus}#{i}", ds[i]) for i in picked]
        small += [(f"{corpus}#{i}", ds[i]) for i in sample(ds, budget[corpus] // 6, seed=7)]
    cn14 = unassigned_in_14()
    hard = hard_cases(cn14)
    special = [(f"special-{i}", t) for i, t in enumerate(SPECIAL_TEXTS)]
    # Documents joined by end-of-text markers, as `prepare` writes them (allow_special).
    joined = [(f"joined-{i}", "{eot}".join(docs["kjv"][5 * i:5 * i + 3])) for i in range(4)]

    uni = Unicode14()
    log(f"tokenizers: Unicode classes beyond 14.0: {uni.summary()} ({time.time() - t0:.1f}s)")

    def batches(doc_set, default_allow, eot=None, with_hard=True):
        def split(items):
            return [n for n, _ in items], [t for _, t in items]
        j = [(n, t.replace("{eot}", eot or "")) for n, t in joined]
        h = hard if with_hard else []
        b = [(*split(doc_set), default_allow, False),
             (*split(h), False, False), (*split(h), True, False),
             (*split(special), False, False), (*split(special), True, False),
             (*split(special[:4] + h[:8]), default_allow, True)]
        if eot:
            b.append((*split(j), True, False))
        return b

    manifest = []

    def emit(name, path, ref, reference, doc_set, default_allow, eot=None, with_hard=True):
        n, nb, u14 = write_fixture(os.path.join(out, name + ".jsonl"), ref,
                                   batches(doc_set, default_allow, eot, with_hard))
        manifest.append({"name": name, "path": path, "fixture": name + ".jsonl",
                         "reference": reference, "docs": n, "bytes": nb, "unicode14_docs": u14})
        log(f"tokenizers: {name}: {n} docs, {nb / 1e6:.2f} MB, {u14} with Unicode 14 "
            f"differences ({time.time() - t0:.1f}s)")

    tk = f"tiktoken {tiktoken.__version__}"
    hf = f"tokenizers {tokenizers.__version__}"
    encodings = {}
    for name in TIKTOKEN_ENCODINGS:
        enc, ranks, meta = load_encoding(assets, name)
        encodings[name] = (enc, ranks, meta)
        emulated = tiktoken.Encoding(name + "-u14", pat_str=uni.rewrite("tiktoken", enc._pat_str),
                                     mergeable_ranks=ranks, special_tokens=meta["special_tokens"])
        bos = meta["special_tokens"].get("<|begin_of_text|>")
        eot = "<|end_of_text|>" if name == "llama3" else "<|endoftext|>"
        emit(f"tiktoken-{name}", os.path.join(assets, name + ".tiktoken"),
             TiktokenRef(enc, emulated, uni, bos), tk, main, False, eot)

    # lmforge's built-in patterns (a rank file without its .json) against tiktoken's own.
    import tiktoken_ext.openai_public as openai_public
    builtin_dir = os.path.join(out, "builtin")
    os.makedirs(builtin_dir, exist_ok=True)
    for name in ["gpt2", "cl100k_base", "o200k_base"]:
        _, ranks, meta = encodings[name]
        pat = _official_pattern(openai_public, name)
        enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks,
                                special_tokens=meta["special_tokens"])
        emulated = tiktoken.Encoding(name + "-u14", pat_str=uni.rewrite("tiktoken", pat),
                                     mergeable_ranks=ranks, special_tokens=meta["special_tokens"])
        link = os.path.join(builtin_dir, name + ".tiktoken")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.join(assets, name + ".tiktoken"), link)
        emit(f"tiktoken-builtin-{name}", link, TiktokenRef(enc, emulated, uni), tk, small, False,
             "<|endoftext|>")

    # HF tokenizer.json files built from the rank files.
    def save(tok, name):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        return os.path.join(d, "tokenizer.json")

    gpt2_pattern = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|"""
                    r"""\s+""")
    _, gpt2_ranks, _ = encodings["gpt2"]
    for name, aps in [("hf-gpt2", False), ("hf-gpt2-prefix-space", True)]:
        tok = hf_gpt2(gpt2_ranks, 50256, aps)
        emulated = hf_gpt2(gpt2_ranks, 50256, False, uni.rewrite("onig", gpt2_pattern))
        path = save(tok, name)
        emit(name, path, HfRef(tok, emulated, uni, emulated_prefix_space=aps), hf,
             main if not aps else small, True, "<|endoftext|>")
        if not aps:
            vocab_json, merges_txt = write_vocab_merges(path, os.path.join(out, "gpt2-merges"))
            manifest.append({**manifest[-1], "name": "gpt2-vocab-merges", "path": vocab_json,
                             "reference": hf + " (same files as hf-gpt2)"})
    _, l3_ranks, l3_meta = encodings["llama3"]
    tok = hf_llama3(l3_ranks, l3_meta, l3_meta["pat_str"])
    emulated = hf_llama3(l3_ranks, l3_meta, uni.rewrite("onig", l3_meta["pat_str"]))
    emit("hf-llama3", save(tok, "hf-llama3"), HfRef(tok, emulated, uni, has_bos=True), hf, main,
         True, "<|end_of_text|>")

    # Added tokens with lstrip/rstrip/special=false; a Split that leaves text between its matches
    # (kept as pieces); merges listed twice (the later rank wins).
    tok = with_flagged_added_tokens(hf_gpt2(gpt2_ranks, 50256, False))
    emulated = with_flagged_added_tokens(
        hf_gpt2(gpt2_ranks, 50256, False, uni.rewrite("onig", gpt2_pattern)))
    emit("hf-added-flags", save(tok, "hf-added-flags"), HfRef(tok, emulated, uni), hf,
         flagged_token_texts(small[:80]) + small[:40], False, "<|endoftext|>")
    words = r"\p{L}+"
    split_tok = hf_gpt2(gpt2_ranks, 50256, False, words)
    emit("hf-split-words", save(split_tok, "hf-split-words"),
         HfRef(split_tok, hf_gpt2(gpt2_ranks, 50256, False, uni.rewrite("onig", words)), uni), hf,
         small, True, "<|endoftext|>")
    # SmolLM's layout: Digits(individual_digits) before ByteLevel's regex. Without the
    # every-code-point hard cases: Digits classifies by Rust's newer Unicode tables, which the
    # Unicode 14 emulation (a regex rewrite) cannot reach; numbers written many ways instead.
    digits_tok = hf_gpt2(gpt2_ranks, 50256, False)
    digits_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    numbers = [(f"numbers-{i}", t) for i, t in enumerate([
        "In 1611, 1,234.56 and 007 agents; 3x+4y=25 at 12:30pm, v2.0.1, 0xFF, 1e-9.",
        "Fullwidth \uff11\uff12\uff13, Arabic-Indic \u0661\u0662\u0663, superscript x\u00b2, \u2167 and \u00bd.",
        "  42  \n\n 7\t8 9   10 ", "abc123def 456 ghi789", "1" * 300 + " " + "9" * 17])]
    emit("hf-digits", save(digits_tok, "hf-digits"), HfRef(digits_tok), hf,
         numbers + small[:200], True, "<|endoftext|>", with_hard=False)
    repeat = [0, 3, 40, 700]
    dup_path = os.path.join(out, "hf-gpt2-dup-merges", "tokenizer.json")
    os.makedirs(os.path.dirname(dup_path), exist_ok=True)
    with open(dup_path, "w", encoding="utf-8") as f:
        f.write(with_duplicate_merges(hf_gpt2(gpt2_ranks, 50256, False).to_str(), repeat))
    dup = Tokenizer.from_file(dup_path)
    dup_emulated = Tokenizer.from_str(with_duplicate_merges(
        hf_gpt2(gpt2_ranks, 50256, False, uni.rewrite("onig", gpt2_pattern)).to_str(), repeat))
    emit("hf-gpt2-dup-merges", dup_path, HfRef(dup, dup_emulated, uni), hf, small, True,
         "<|endoftext|>")

    # Unicode normal forms: NFC as in Qwen2's tokenizer.json (on the main sample), and the other
    # three on the small one; all with the texts the forms change.
    _, cl_ranks, cl_meta = encodings["cl100k_base"]
    norm_texts = [(f"normalization-{i}", t) for i, t in enumerate(NORMALIZATION_TEXTS)]
    for form, doc_set in [("NFC", main), ("NFD", small), ("NFKC", small), ("NFKD", small)]:
        make_norm = getattr(normalizers, form)
        tok = hf_normalized(cl_ranks, cl_meta, QWEN2_PATTERN, make_norm())
        emulated = hf_normalized(cl_ranks, cl_meta, uni.rewrite("onig", QWEN2_PATTERN),
                                 make_norm())
        name = "hf-qwen2-nfc" if form == "NFC" else f"hf-{form.lower()}"
        emit(name, save(tok, name), HfRef(tok, emulated, uni), hf, norm_texts + doc_set, True,
             "<|endoftext|>")

    sp_vocab, sp_merges = train_sentencepiece_style(kjv_lines)
    for name, metaspace in [("hf-sp-bpe", False), ("hf-sp-metaspace", True)]:
        tok = hf_sentencepiece_style(sp_vocab, sp_merges, metaspace)
        emit(name, save(tok, name), HfRef(tok, has_bos=True), hf, main, True, "</s>")
    # Characters without a token: one <unk> per run (fuse_unk) without byte fallback; dropped
    # when byte fallback lacks some of their bytes and there is no unk token.
    tok = hf_sentencepiece_style(sp_vocab, sp_merges, False, byte_fallback=False)
    emit("hf-sp-unk", save(tok, "hf-sp-unk"), HfRef(tok, has_bos=True), hf, small, True, "</s>")
    ascii_bytes = {s: i for s, i in sp_vocab.items()
                   if not (s.startswith("<0x") and len(s) == 6 and int(s[3:5], 16) >= 0x80)}
    ascii_bytes = {s: i for i, (s, _) in enumerate(sorted(ascii_bytes.items(),
                                                          key=lambda kv: kv[1]))}
    tok = hf_sentencepiece_style(ascii_bytes, sp_merges, False, unk_token=None)
    emit("hf-sp-partial-bytes", save(tok, "hf-sp-partial-bytes"), HfRef(tok, has_bos=True), hf,
         small, True, "</s>")

    sp_dir = os.path.join(out, "sentencepiece-bpe")
    os.makedirs(sp_dir, exist_ok=True)
    sp_path = os.path.join(sp_dir, "tokenizer.model")
    sp = train_sentencepiece(kjv_lines, sp_path)
    emit("sentencepiece-bpe", sp_path, SentencePieceRef(sp), f"sentencepiece {spm.__version__}",
         main, False)
    # SentencePiece's defaults (unigram, nmt_nfkc, no byte fallback): a run of characters the
    # model lacks is one <unk>, however long (lmforge shortens long runs, over which Debian's
    # libsentencepiece 0.1.97 takes time growing with their square).
    uni_path = os.path.join(out, "sentencepiece-unigram", "tokenizer.model")
    os.makedirs(os.path.dirname(uni_path), exist_ok=True)
    # (Hangul syllables in its training text: it has 가 but not the jamo U+1100 U+1161, which
    # nmt_nfkc composes into it: characters unknown alone, a piece together)
    hangul = ["가나다라마바사 아자차카타파하 " * 4] * 60
    sp = train_sentencepiece(kjv_lines + hangul, uni_path,
                             dict(model_type="unigram", vocab_size=1000))
    # Long documents too: libsentencepiece 0.1.97's Viterbi over a whole one (float sums) breaks
    # near-ties unlike sentencepiece 0.2 from ~100 KB on (lmforge encodes them in chunks).
    kjv = kjv_text()
    long_docs = [(f"kjv-long-{i}", kjv[i * 1_500_000:i * 1_500_000 + 300_000]) for i in range(3)]
    emit("sentencepiece-unigram", uni_path, SentencePieceRef(sp),
         f"sentencepiece {spm.__version__}", small + unknown_runs() + long_docs, False)

    with open(os.path.join(out, "manifest.json.tmp"), "w") as f:
        json.dump({"tier": "full" if full else "fast", "tokenizers": manifest,
                   "unicode14_extra": uni.summary()}, f, indent=1)
    os.replace(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))
    log(f"tokenizers: {len(manifest)} fixtures in {out} ({time.time() - t0:.1f}s)")


def _official_pattern(openai_public, name):
    """tiktoken's own pat_str for a public encoding, without downloading its ranks."""
    saved = openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks
    openai_public.load_tiktoken_bpe = openai_public.data_gym_to_mergeable_bpe_ranks = (
        lambda *a, **k: {})
    try:
        return getattr(openai_public, name)()["pat_str"]
    finally:
        openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = saved


def write_vocab_merges(tokenizer_json, out_dir):
    """GPT-2's vocab.json + merges.txt layout from a byte-level tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    j = json.load(open(tokenizer_json, encoding="utf-8"))
    vocab = dict(j["model"]["vocab"])
    for a in j["added_tokens"]:
        vocab[a["content"]] = a["id"]
    vocab_json = os.path.join(out_dir, "vocab.json")
    with open(vocab_json, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in j["model"]["merges"]:
            f.write((" ".join(m) if isinstance(m, list) else m) + "\n")
    return vocab_json, os.path.join(out_dir, "merges.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="fixture directory")
    ap.add_argument("--assets", required=True, help="../shared/assets/tokenizers")
    ap.add_argument("--full", action="store_true", help="every document of the corpora")
    args = ap.parse_args()
    make(args.out, args.assets, args.full)


if __name__ == "__main__":
    main()
