"""Hugging Face transformers as the reference for lmforge's import and export.

  hf_models_ref.py make OUT          one tiny random model per family, saved by transformers'
                                     save_pretrained into OUT/<case>/, with a byte-level BPE
                                     tokenizer and OUT/<case>/ref.safetensors holding tokens,
                                     targets, logits (float32), the loss, and a greedy
                                     generation (prompt, new ids, each step's logit margin)
  hf_models_ref.py check DIR...      loads each lmforge-exported DIR with AutoModelForCausalLM and
                                     AutoTokenizer; writes DIR/hf_logits.safetensors for DIR's
                                     tokens.safetensors and DIR/hf_tokens.json with AutoTokenizer's
                                     ids for DIR/corpus.txt

The families and their tricky parts: GPT-2 (Conv1D weights), Llama 3 (GQA, llama3 rope
scaling), TinyLlama (Llama 2 shapes), SmolLM (tied embeddings), Llama with biases, Mistral
(sliding window shorter than the sequence), Qwen2 (q/k/v biases), Qwen3 (q/k norm, head_dim !=
hidden/heads), Phi-3 (fused qkv and gate_up, sliding window), Gemma (GeGLU, scaled embeddings,
1 + w norms), Gemma 2 (post norms, windows on every other layer, soft-capped attention scores
and logits, query_pre_attn_scalar), Gemma 3 (q/k norms, windows on some layers with their own
RoPE base), Gemma 3 4B's multimodal model (its text model; linear RoPE scaling). Two extra
saves test loading:
sharded (model.safetensors.index.json) and bfloat16 weights. PEFT_IMPORTS: LoRA adapters for
lmforge to merge on import.
"""
import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

V, T, B = 320, 16, 2
PROMPT, GEN = 6, 24  # greedy generation: prompt and new tokens (within every case's context)

COMMON = dict(vocab_size=V, bos_token_id=256, eos_token_id=256, pad_token_id=None)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             tie_word_embeddings=False)

CASES = {
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                          embd_pdrop=0.0, resid_pdrop=0.0)),
    "llama3": ("llama", dict(LLAMA, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16})),
    "tinyllama": ("llama", dict(LLAMA, num_key_value_heads=1, rope_theta=10000.0)),
    "smollm": ("llama", dict(LLAMA, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(LLAMA, sliding_window=5, head_dim=16)),
    # Qwen2, Phi-3: head_dim != hidden_size / heads, which their attention reads though their
    # configs do not list it.
    "qwen2": ("qwen2", dict(LLAMA, tie_word_embeddings=True, use_sliding_window=False,
                            head_dim=32)),
    "qwen3": ("qwen3", dict(LLAMA, head_dim=32, use_sliding_window=False)),
    "phi3": ("phi3", dict(LLAMA, num_key_value_heads=4, sliding_window=6,
                          original_max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0,
                          head_dim=32)),
    # Gemma: GeGLU, embeddings times sqrt(72) (not a round fp32 number), norms scaling by 1 + w.
    "gemma": ("gemma", dict(LLAMA, hidden_size=72, head_dim=32, tie_word_embeddings=True)),
    # Gemma 2: post norms, a window of 5 on layers 0 and 2 (layer 1 full), scores scaled by
    # 24^-1/2 (query_pre_attn_scalar != head_dim) and soft-capped at 1 (scores reach ~1), logits
    # soft-capped at 1.5 (they reach ~1): both caps bend what passes through them.
    "gemma2": ("gemma2", dict(LLAMA, hidden_size=72, head_dim=32, query_pre_attn_scalar=24,
                              num_hidden_layers=3, sliding_window=5, attn_logit_softcapping=1.0,
                              final_logit_softcapping=1.5, tie_word_embeddings=True)),
    # Gemma 3: q/k norms, post norms, a window of 5 on layers 0 and 2 (layer 1 full) with their
    # own RoPE base (10000 against 1e6).
    "gemma3": ("gemma3_text", dict(LLAMA, hidden_size=72, head_dim=32, query_pre_attn_scalar=32,
                                   num_hidden_layers=3, sliding_window=5, sliding_window_pattern=2,
                                   tie_word_embeddings=True)),
    # Gemma 3 4B and up (Gemma3ForConditionalGeneration): the text model in text_config, with
    # linear RoPE scaling (factor 4) on its full layers, the windowed ones unscaled at the same base
    # (1e6), scores scaled by 24^-1/2; the head tied by the top level's flag (text_config's says
    # no); a tiny SigLIP vision tower lmforge leaves out (text-only inputs never reach it).
    "gemma3_mm": ("gemma3", dict(
        text_config=dict(LLAMA, **COMMON, hidden_size=72, head_dim=32, query_pre_attn_scalar=24,
                         num_hidden_layers=3, sliding_window=5, sliding_window_pattern=2,
                         rope_local_base_freq=1e6, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "linear", "factor": 4.0}),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14),
        mm_tokens_per_image=4, bos_token_id=256, eos_token_id=256)),
}
# Same model as a case above, saved differently. *_renamed: a multimodal Gemma 3's tensors under
# its modules' names (model.language_model.*, model.vision_tower.*) instead of the names
# save_pretrained writes, the Hub's (language_model.model.*, vision_tower.*); transformers loads
# both.
SAVES = {"llama3_sharded": ("llama3", dict(max_shard_size="40KB"), None),
         "qwen3_bf16": ("qwen3", {}, torch.bfloat16),
         "gemma3_mm_renamed": ("gemma3_mm", {}, None)}
MODULE_NAMES = [("language_model.model.", "model.language_model."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector.")]


def corpus():
    """Real text for the tokenizer: the King James Bible (bible-kjv) when installed."""
    try:
        import subprocess
        return subprocess.run(["bible", "-f", "Gen1:1-Gen11:32"], capture_output=True, text=True,
                              check=True).stdout
    except Exception:
        return open(__file__).read()


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus().splitlines(), trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(path)
    return tok


def randomize(model, gen):
    """Weights well away from the init scale so every path matters: norms near 1, the rest
    N(0, 0.1); biases too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def attention(config):
    """Eager attention where scores are soft-capped (SDPA ignores the cap; transformers picks eager
    for Gemma 2 itself, pinned here so the reference does not depend on its version)."""
    capped = getattr(config.get_text_config(), "attn_logit_softcapping", None)
    return "eager" if capped else None  # None: transformers' default


def build(case):
    model_type, kw = CASES[case]
    common = {} if model_type == "gemma3" else COMMON  # (the multimodal config's are its text's)
    config = transformers.AutoConfig.for_model(model_type, **common, **kw)
    config.dtype = torch.float32
    gen = torch.Generator().manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation=attention(config))
    randomize(model, gen)
    return model.eval()


def reference(model, out_dir):
    gen = torch.Generator().manual_seed(99)
    seq = torch.randint(0, V, (B, T + 1), generator=gen)
    tokens, targets = seq[:, :T].contiguous(), seq[:, 1:].contiguous()
    # The loss's gradient with respect to every weight ("grad.<HF name>"), through autograd.
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = model(input_ids=tokens).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        loss.backward()
    # (a multimodal Gemma 3's text model by the names of Gemma3ForCausalLM's, lmforge's)
    grads = {"grad." + n.replace("model.language_model.", "model."): p.grad.float().contiguous()
             for n, p in model.named_parameters() if p.grad is not None}
    logits, loss = logits.detach(), loss.detach()
    # Greedy generation through transformers' own KV cache: GEN new tokens after a prompt of
    # the first PROMPT tokens, with each step's margin (top logit minus the runner-up) telling
    # how close the choice was.
    prompt = tokens[:1, :PROMPT]
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id, gc.pad_token_id = None, 0  # no stopping, no end-of-text suppression
    with torch.no_grad():
        g = model.generate(prompt, generation_config=gc, max_new_tokens=GEN, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack([s[0].float().topk(2).values for s in g.logits])
    save_file({"tokens": tokens.to(torch.int32), "targets": targets.to(torch.int32),
               "logits": logits.contiguous(), "loss": loss.reshape(1),
               "gen_prompt": prompt[0].to(torch.int32).contiguous(),
               "gen_ids": g.sequences[0, PROMPT:].to(torch.int32).contiguous(),
               "gen_margin": (top2[:, 0] - top2[:, 1]).contiguous(), **grads},
              os.path.join(out_dir, "ref.safetensors"))


# PEFT LoRA adapters made here (not by lmforge) for lmforge to merge on import: a subset of
# Llama's projections with rsLoRA's scaling (separate q and v adapters where lmforge fuses
# q/k/v), and GPT-2's Conv1D layers (fan_in_fan_out). OUT/<name>/adapter holds the adapter,
# OUT/<name>/ref.safetensors the logits of the base model with it merged.
PEFT_IMPORTS = {
    "llama3_peftin": ("llama3", dict(r=4, lora_alpha=8, use_rslora=True, fan_in_fan_out=False,
                                     target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2_peftin": ("gpt2", dict(r=2, lora_alpha=6, use_rslora=False, fan_in_fan_out=True,
                                 target_modules=["c_attn", "mlp.c_proj"])),
}


def make_peft_adapter(model, adir, opts, seed):
    """Random A and B (as a trained adapter has: B is no longer 0) for every targeted module,
    saved with PEFT's keys and adapter_config.json fields."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in opts["target_modules"]):
            continue
        w = mod.weight
        fan_in, fan_out = (w.shape[0], w.shape[1]) if opts["fan_in_fan_out"] else (w.shape[1],
                                                                                  w.shape[0])
        key = "base_model.model." + name
        tensors[key + ".lora_A.weight"] = 0.2 * torch.randn(opts["r"], fan_in, generator=gen)
        tensors[key + ".lora_B.weight"] = 0.2 * torch.randn(fan_out, opts["r"], generator=gen)
    assert tensors, opts
    os.makedirs(adir, exist_ok=True)
    save_file(tensors, os.path.join(adir, "adapter_model.safetensors"))
    cfg = dict(opts, peft_type="LORA", task_type="CAUSAL_LM", lora_dropout=0.0, bias="none",
               use_dora=False, modules_to_save=None, base_model_name_or_path=None,
               inference_mode=True)
    with open(os.path.join(adir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def make(out):
    os.makedirs(out, exist_ok=True)
    tok_path = os.path.join(out, "tokenizer.json")
    make_tokenizer(tok_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    models = {}
    for case in CASES:
        d = os.path.join(out, case)
        models[case] = build(case)
        models[case].save_pretrained(d)
        fast.save_pretrained(d)
        reference(models[case], d)
    for name, (case, kwargs, dtype) in SAVES.items():
        d = os.path.join(out, name)
        m = models[case] if dtype is None else build(case).to(dtype)
        m.save_pretrained(d, **kwargs)
        fast.save_pretrained(d)
        if name.endswith("_renamed"):
            rename_to_modules(os.path.join(d, "model.safetensors"))
        # The reference is what transformers computes from the saved files, in float32.
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        if name.endswith("_renamed"):  # every tensor found under its new name
            tokens = torch.arange(T).reshape(1, T) % V
            with torch.no_grad():
                assert torch.equal(reloaded(input_ids=tokens).logits, m(input_ids=tokens).logits)
        reference(reloaded.eval(), d)
    for seed, (name, (case, opts)) in enumerate(PEFT_IMPORTS.items()):
        d = os.path.join(out, name)
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, case),
                                                                  dtype=torch.float32).eval()
        make_peft_adapter(model, os.path.join(d, "adapter"), opts, 1000 + seed)
        apply_peft_adapter(model, os.path.join(d, "adapter"))
        reference(model, d)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(sorted(list(CASES) + list(SAVES)), f)


def rename_to_modules(path):
    """Rewrites a saved multimodal Gemma 3's tensors under its modules' names (MODULE_NAMES)."""
    tensors = load_file(path)
    assert any(k.startswith("language_model.model.") for k in tensors), list(tensors)[:5]
    renamed = {}
    for k, t in tensors.items():
        for saved, module in MODULE_NAMES:
            if k.startswith(saved):
                k = module + k[len(saved):]
                break
        renamed[k] = t
    assert any(k.startswith("model.language_model.") for k in renamed), list(renamed)[:5]
    save_file(renamed, path, metadata={"format": "pt"})


def apply_peft_adapter(model, adir):
    """Merges a PEFT LoRA adapter directory into model as PEFT's merge_and_unload does (written from
    PEFT's LoraLayer.get_delta_weight: W += transpose(B @ A, fan_in_fan_out) * scaling, scaling
    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), checking the keys and config a PEFT
    load relies on."""
    cfg = json.load(open(os.path.join(adir, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM", cfg
    w = load_file(os.path.join(adir, "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    merged = 0
    for key, a in w.items():
        if key.endswith(".lora_B.weight"):
            continue
        prefix, suffix = "base_model.model.", ".lora_A.weight"
        assert key.startswith(prefix) and key.endswith(suffix), key
        name = key[len(prefix):-len(suffix)]
        assert any(name == t or name.endswith("." + t) for t in cfg["target_modules"]), name
        b = w[key.replace(".lora_A.", ".lora_B.")]
        assert a.shape[0] == cfg["r"] and b.shape[1] == cfg["r"], (key, a.shape, b.shape)
        delta = (b.double() @ a.double()) * scale
        with torch.no_grad():
            layer = modules[name]
            layer.weight += (delta.t() if cfg["fan_in_fan_out"] else delta).to(layer.weight.dtype)
        merged += 1
    # Every targeted module of the model got its adapter.
    targeted = [n for n in modules if any(n.endswith("." + t) for t in cfg["target_modules"])]
    assert merged == len(targeted), (merged, len(targeted))


def check(dirs):
    for d in dirs:
        config = transformers.AutoConfig.from_pretrained(d)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation=attention(config)).eval()
        if os.path.isdir(os.path.join(d, "adapter")):
            apply_peft_adapter(model, os.path.join(d, "adapter"))
        tokens = load_file(os.path.join(d, "tokens.safetensors"))["tokens"].long()
        with torch.no_grad():
            logits = model(input_ids=tokens).logits.float().contiguous()
        tok = transformers.AutoTokenizer.from_pretrained(d)
        # Greedy generation under the export's own generation_config (its suppress_tokens: the
        # ids past the tokenizer's, vocabulary padding lmforge never samples): the ids, each
        # step's margin over the processed scores, and the steps whose raw argmax is padding.
        gc = copy.deepcopy(model.generation_config)
        gc.eos_token_id, gc.pad_token_id = None, 0
        with torch.no_grad():
            g = model.generate(tokens[:1, :PROMPT], generation_config=gc, max_new_tokens=GEN,
                               do_sample=False, output_scores=True, output_logits=True,
                               return_dict_in_generate=True)
        top2 = torch.stack([s[0].float().topk(2).values for s in g.scores])
        padded_wins = sum(int(x[0].argmax()) >= len(tok) for x in g.logits)
        save_file({"logits": logits, "gen_ids": g.sequences[0, PROMPT:].to(torch.int32).contiguous(),
                   "gen_margin": (top2[:, 0] - top2[:, 1]).contiguous(),
                   "gen_padded_wins": torch.tensor([padded_wins], dtype=torch.int32)},
                  os.path.join(d, "hf_logits.safetensors"))
        text = open(os.path.join(d, "corpus.txt"), encoding="utf-8").read()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with open(os.path.join(d, "hf_tokens.json"), "w") as f:
            json.dump({"ids": ids, "class": type(model).__name__}, f)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    elif sys.argv[1] == "check":
        check(sys.argv[2:])
    else:
        sys.exit("usage: hf_models_ref.py make OUT | check DIR...")
