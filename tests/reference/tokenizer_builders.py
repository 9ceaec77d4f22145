"""The reference tokenizers of tokenizer_ref.py, built with tiktoken, Hugging Face `tokenizers`
and `sentencepiece` from the rank files of ../shared/assets/tokenizers or trained on the KJV:
GPT-2 and Llama 3 style tokenizer.json files, Qwen2's layout with a Unicode normal form,
SentencePiece-style BPE (Prepend/Replace or Metaspace), added tokens with flags, duplicated
merges, and a SentencePiece .model."""

import json
import os
import random
import tempfile

import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

def bytes_to_unicode():
    """GPT-2's byte <-> printable character map (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_MAP = bytes_to_unicode()


def byte_str(b):
    return "".join(BYTE_MAP[x] for x in b)


def cached(fn):
    """Memoizes fn(ranks) by the identity of the ranks dict (each is built once)."""
    memo = {}

    def wrapper(ranks):
        if id(ranks) not in memo:
            memo[id(ranks)] = (ranks, fn(ranks))
        return memo[id(ranks)][1]
    return wrapper


@cached
def merges_one_per_token(ranks):
    """GPT-2's merges.txt recovered from tiktoken ranks: each token is BPE-merged from its bytes
    with only lower ranks allowed; the last merge (two parts left) is its merge rule."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                raise ValueError(f"token {tok!r} (rank {rank}) is not reachable by merges")
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        merges.append((byte_str(parts[0]), byte_str(parts[1])))
    return merges


@cached
def merges_all_splits(ranks):
    """Every split of a token into two tokens, at the token's rank (transformers'
    TikTokenConverter, as in the published Llama 3 tokenizer.json)."""
    merges = []
    for tok, rank in ranks.items():
        local = []
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in ranks and right in ranks:
                local.append((ranks[left], ranks[right], left, right))
        local.sort()
        merges += [(rank, byte_str(a), byte_str(b)) for _, _, a, b in local]
    merges.sort(key=lambda m: m[0])
    return [(a, b) for _, a, b in merges]


def load_encoding(assets, name, pat_str=None):
    meta = json.load(open(os.path.join(assets, name + ".json")))
    ranks = load_tiktoken_bpe(os.path.join(assets, name + ".tiktoken"))
    return tiktoken.Encoding(name, pat_str=pat_str or meta["pat_str"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"]), ranks, meta


def hf_gpt2(ranks, eot, add_prefix_space, pattern=None):
    vocab = {byte_str(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, merges_one_per_token(ranks)))
    if pattern:  # the Unicode 14 emulation: ByteLevel's own regex, rewritten
        assert not add_prefix_space, "a Split before ByteLevel would add a space to every piece"
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert tok.token_to_id("<|endoftext|>") == eot
    return tok


def hf_split_byte_level(ranks, meta, pattern, ignore_merges, normalizer=None):
    """Byte-level BPE from tiktoken ranks after a Split with `pattern` (every split of a token as
    a merge, as transformers' TikTokenConverter), the specials as added tokens (numbered by HF
    from the vocabulary's size)."""
    vocab = {byte_str(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, merges_all_splits(ranks), ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = sorted(meta["special_tokens"].items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    return tok


def hf_llama3(ranks, meta, pattern):
    tok = hf_split_byte_level(ranks, meta, pattern, ignore_merges=True)
    for s, i in meta["special_tokens"].items():  # they follow on from the ranks
        assert tok.token_to_id(s) == i, (s, i)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    return tok


SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def train_sentencepiece_style(train_lines):
    """BPE trained with `tokenizers` (vocab ~2000), laid out as HF exports SentencePiece models:
    <unk> <s> </s>, the 256 <0xXX> byte-fallback tokens, then the pieces. -> (vocab, merges)"""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=1800, special_tokens=SP_SPECIALS,
                                  show_progress=False)
    trainer_tok.train_from_iterator(train_lines, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(SP_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in trained["merges"]]
    return vocab, merges


def hf_sentencepiece_style(vocab, merges, metaspace, byte_fallback=True, unk_token="<unk>"):
    """A Llama-2-style tokenizer.json. metaspace=False: Prepend + Replace normalizers (Llama 2's
    export); True: a Metaspace pre-tokenizer with prepend_scheme "first", split off
    (transformers' non-legacy export). byte_fallback / unk_token vary what happens to characters
    without a token."""
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk_token, byte_fallback=byte_fallback,
                               fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                     split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SP_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


# Added tokens with Hugging Face's flags (appended after GPT-2's <|endoftext|>): "special": false
# tokens are matched in text even with split_special_tokens; lstrip/rstrip take the whitespace
# before/after them.
ADDED_WITH_FLAGS = [("<think>", dict(special=False)), ("</think>", dict(special=False)),
                    ("<tool_call>", dict(special=False, lstrip=True, rstrip=True)),
                    ("<mask>", dict(special=True, lstrip=True)),
                    ("<|assistant|>", dict(special=True, rstrip=True))]


def hf_normalized(ranks, meta, pattern, normalizer):
    """Qwen2's layout (ByteLevel BPE after a Split with its pattern, merges not skipped) with a
    normalizer, from tiktoken ranks."""
    return hf_split_byte_level(ranks, meta, pattern, ignore_merges=False, normalizer=normalizer)


def with_flagged_added_tokens(tok):
    for text, flags in ADDED_WITH_FLAGS:
        tok.add_tokens([AddedToken(text, normalized=False, **flags)])
    return tok


def flagged_token_texts(docs, seed=11):
    """Documents with the flagged added tokens inserted among assorted whitespace."""
    rng = random.Random(seed)
    spaces = ["", " ", "  ", "\n", "\t ", " \n\n", "\u3000", "\u00a0 "]
    out = []
    for i, (name, text) in enumerate(docs):
        text = text[:600]
        for _ in range(4):
            at = rng.randrange(len(text) + 1)
            tok = rng.choice(ADDED_WITH_FLAGS)[0]
            text = text[:at] + rng.choice(spaces) + tok + rng.choice(spaces) + text[at:]
        out.append((f"flags-{i}:{name}", text))
    return out


def with_duplicate_merges(tokenizer_json_text, ranks_to_repeat):
    """The same tokenizer.json with some merges listed again at the end (HF keeps the later
    rank)."""
    j = json.loads(tokenizer_json_text)
    merges = j["model"]["merges"]
    merges += [merges[r] for r in ranks_to_repeat]
    return json.dumps(j, ensure_ascii=False)


LLAMA2_SENTENCEPIECE = dict(
    model_type="bpe", vocab_size=2000, byte_fallback=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
    allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
    pad_id=-1)


def train_sentencepiece(train_lines, path, options=LLAMA2_SENTENCEPIECE):
    """A SentencePiece model, by default with Llama 2's options (BPE, identity normalization,
    byte fallback, dummy prefix, digits split, whitespace kept); `options` replaces them (the
    trainer's defaults for what it leaves out)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write("\n".join(train_lines))
    try:
        spm.SentencePieceTrainer.train(input=f.name, model_prefix=path[:-len(".model")],
                                       num_threads=2, minloglevel=2, **options)
    finally:
        os.unlink(f.name)
    return spm.SentencePieceProcessor(model_file=path)
