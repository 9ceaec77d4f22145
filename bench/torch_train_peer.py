"""PyTorch peer for `lmforge bench train`: a nanoGPT-style model of the same shape (GPT-2, or a
Llama with RMSNorm, RoPE, SwiGLU and grouped-query attention) trained with torch.optim.AdamW on
random tokens, fp32 eager or bf16 autocast, optionally under torch.compile, on the same CPU
threads or on a GPU (--device cuda: F.scaled_dot_product_attention, fused AdamW). Runs on the current PyTorch and on Debian's 1.13 (no F.scaled_dot_product_attention
there: the attention is then written out). Prints "peak resident N MiB" and a last line
"torch <version> <preset> B=.. T=.. <precision>[+compile]: <number> tok/s" like lmforge's."""
import argparse
import copy
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# As lmforge's presets (src/lmforge/models/presets.cpp).
GPT2 = {  # (n_layer, n_head, n_embd); vocab 50257, 1024 positions
    "gpt2-tiny": (4, 4, 128),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
}
LLAMA = {  # (n_layer, n_head, n_kv_head, n_embd, ffn_hidden, vocab, rope_theta, tied)
    "llama3-tiny": (4, 4, 2, 128, 352, 128256, 10000.0, False),
    "smollm2-135m": (30, 9, 3, 576, 1536, 49152, 100000.0, True),
    "llama3.2-1b": (16, 32, 8, 2048, 8192, 128256, 500000.0, True),
}
# Families no nanoGPT-style model here covers: transformers' own model (what a user of that family
# trains), from the reference environment (not on Debian's PyTorch 1.13, which has no transformers).
HF = {
    "gemma3-270m": ("gemma3_text", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=32768, sliding_window=512, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    # google/gemma-2-2b: soft-capped attention (transformers runs its eager attention: SDPA has no
    # soft-capping) and logits
    "gemma2-2b": ("gemma2", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=8192, sliding_window=4096, rms_norm_eps=1e-6,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True)),
}


def attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.size(-2)
    s = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(v.dtype) @ v


class GptBlock(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.nh = NH
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        y = attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, L, NH, C, V=50257, maxT=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(maxT, C)
        self.blocks = nn.ModuleList(GptBlock(C, NH) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx, targets=None, reduction="mean"):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # tied head
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                               reduction=reduction)


class RMSNorm(nn.Module):
    def __init__(self, C, eps=1e-5):
        super().__init__()
        self.w, self.eps = nn.Parameter(torch.ones(C)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.w


def rotate(x, cos, sin):  # HF rotate_half layout
    h = x.size(-1) // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


class LlamaBlock(nn.Module):
    def __init__(self, C, NH, NKV, F_):
        super().__init__()
        self.nh, self.nkv, self.hs = NH, NKV, C // NH
        self.n1, self.n2 = RMSNorm(C), RMSNorm(C)
        self.qkv = nn.Linear(C, (NH + 2 * NKV) * self.hs, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.gate_up = nn.Linear(C, 2 * F_, bias=False)
        self.down = nn.Linear(F_, C, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(self.n1(x)).split(
            [self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], dim=2)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, L, NH, NKV, C, F_, V, theta, tied):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(LlamaBlock(C, NH, NKV, F_) for _ in range(L))
        self.norm = RMSNorm(C)
        self.head = None if tied else nn.Linear(C, V, bias=False)
        self.hs, self.theta = C // NH, theta

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.shape[1]
        dev = idx.device
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hs, 2, device=dev).float() / self.hs))
        f = torch.outer(torch.arange(T, device=dev).float(), inv)
        cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x, cos, sin)
        h = self.norm(x)
        logits = h @ (self.wte.weight if self.head is None else self.head.weight).t()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                               reduction=reduction)


class LoraLinear(nn.Module):
    """PEFT's LoRA layers without dropout on the modules a fused linear holds (Llama's q, k, v
    projections in qkv, gate and up in gate_up; `pieces` their output widths): each module's
    base(x) + (alpha / r) B A x with its own A ~ U(+-1/sqrt(in)) and B = 0, as PEFT adapts
    q_proj, k_proj and v_proj apart."""

    def __init__(self, base, r, alpha, pieces=None, dropout=0.0):
        super().__init__()
        self.base, self.s = base, alpha / r
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # PEFT's lora_dropout
        self.pieces = pieces or [base.out_features]
        bound = 1.0 / math.sqrt(base.in_features)
        self.A = nn.ParameterList(
            nn.Parameter(torch.empty(r, base.in_features).uniform_(-bound, bound))
            for _ in self.pieces)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(w, r)) for w in self.pieces)

    enabled = True  # off: the base layer alone (PEFT's disable_adapter, DPO's reference)

    def forward(self, x):
        if not LoraLinear.enabled:
            return self.base(x)
        delta = [F.linear(F.linear(self.drop(x), a), b) for a, b in zip(self.A, self.B)]
        return self.base(x) + self.s * (delta[0] if len(delta) == 1 else torch.cat(delta, -1))


def add_lora(model, r, alpha, dropout=0.0):
    """Freezes every weight and wraps each block's linear layers with adapters, one per Hugging
    Face module (Llama's qkv is q_proj, k_proj, v_proj; gate_up is gate_proj, up_proj)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(model, HfModel):  # PEFT's layers on each block's q/k/v/o and gate/up/down
        for block in model.blocks:
            for mod in (block.self_attn, block.mlp):
                for name, child in list(mod.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(mod, name, LoraLinear(child, r, alpha, None, dropout))
        return
    for block in model.modules():
        if isinstance(block, (GptBlock, LlamaBlock)):
            for name, child in list(block.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                pieces = None
                if isinstance(block, LlamaBlock) and name == "qkv":
                    pieces = [block.nh * block.hs, block.nkv * block.hs, block.nkv * block.hs]
                elif isinstance(block, LlamaBlock) and name == "gate_up":
                    pieces = [child.out_features // 2] * 2
                setattr(block, name, LoraLinear(child, r, alpha, pieces, dropout))


def row_logps(model, idx, tgt):
    return -model(idx, tgt, "none").view(idx.shape).sum(-1)


def dpo_loss(model, reference, idx, tgt, beta=0.1):
    """TRL's DPO (sigmoid) loss over pairs of rows; the reference's log-likelihoods without
    gradients."""
    with torch.no_grad():
        if reference is None:  # LoRA: the model with its adapters off
            LoraLinear.enabled = False
            ref = row_logps(model, idx, tgt)
            LoraLinear.enabled = True
        else:
            ref = row_logps(reference, idx, tgt)
    pol = row_logps(model, idx, tgt)
    z = beta * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))
    return -F.logsigmoid(z).mean()


def distill_loss(model, teacher, idx, tgt, alpha=0.5, temperature=2.0):
    """Knowledge distillation as Hugging Face's distillation examples compute it: the teacher's
    logits without gradients, (1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) ||
    softmax(student / T)) over every token (full B x T x V logits, autograd)."""
    with torch.no_grad():
        t = teacher(idx).float()
    s = model(idx).float()
    V = s.size(-1)
    ce = F.cross_entropy(s.view(-1, V), tgt.view(-1))
    kl = F.kl_div(F.log_softmax(s / temperature, -1).view(-1, V),
                  F.log_softmax(t / temperature, -1).view(-1, V), log_target=True,
                  reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature * temperature * kl


class HfModel(nn.Module):
    """A transformers causal LM with this file's interface (blocks, wte, head, the loss)."""

    def __init__(self, model_type, kw, dtype=torch.float32):
        super().__init__()
        import transformers
        config = transformers.AutoConfig.for_model(model_type, **kw)
        self.m = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.blocks, self.wte = self.m.model.layers, self.m.model.embed_tokens
        self.head = None if config.tie_word_embeddings else self.m.lm_head
        self.attn_dim = config.num_attention_heads * config.head_dim

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.m(input_ids=idx).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                               reduction=reduction)


def make_model(name, dtype=torch.float32):
    """The model with its weights in dtype (a transformers model made in it, never in fp32)."""
    if name in GPT2:
        return GPT(*GPT2[name]).to(dtype), 50257
    if name in HF:
        return HfModel(*HF[name], dtype=dtype), HF[name][1]["vocab_size"]
    return Llama(*LLAMA[name]).to(dtype), LLAMA[name][5]


def init_like_gpt2(model):
    """nanoGPT's _init_weights (GPT-2's, and lmforge's Transformer::init_weights): N(0, 0.02) for
    the matrices and embeddings, N(0, 0.02 / sqrt(2 L)) for the projections into the residual
    stream, zero biases; norm weights stay ones. (PyTorch's default N(0, 1) embeddings give tied
    logits of ~30 and losses in the hundreds, whose softmax underflows into denormals: Debian's
    torch 1.13 then ran fp32 at ~5 tok/s on one core.)"""
    L = len(model.blocks)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            residual = name.endswith(("proj.weight", "out.weight", "down.weight"))
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if residual else 0.02)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters on every block linear")
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="PEFT's lora_dropout")
    ap.add_argument("--base-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="with --lora-rank and --precision bf16: the frozen weights' dtype (bf16: "
                    "the model made in bf16, as PEFT users load one; the adapters stay fp32, as "
                    "PEFT's autocast_adapter_dtype keeps them)")
    ap.add_argument("--objective", default="clm", choices=["clm", "dpo", "distill"],
                    help="dpo: rows 2j, 2j+1 a pair; TRL's sigmoid loss, beta 0.1, the reference "
                    "a frozen copy (with --lora-rank the model with its adapters off); distill: "
                    "from --teacher (alpha 0.5, temperature 2)")
    ap.add_argument("--teacher", default="", help="distill: the teacher's preset (default the "
                    "model's), its own random weights")
    a = ap.parse_args()
    if a.base_dtype == "bf16" and not (a.lora_rank and a.precision == "bf16"):
        ap.error("--base-dtype bf16 needs --lora-rank and --precision bf16")
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    model, V = make_model(a.model, torch.bfloat16 if a.base_dtype == "bf16" else torch.float32)
    with torch.no_grad():
        init_like_gpt2(model)
    teacher = None
    if a.objective == "distill":
        teacher, tv = make_model(a.teacher or a.model)
        assert tv == V, "the teacher's vocabulary must be the model's"
        with torch.no_grad():
            init_like_gpt2(teacher)
        teacher.requires_grad_(False).eval()
        if a.precision == "bf16":  # (as lmforge holds it, and as HF trainers load a teacher)
            teacher.to(torch.bfloat16)
    # FLOPs per token as lmforge counts them (ModelConfig::flops_per_token): 6N + 12 L C T, N all
    # parameters but the learned positions and, with an untied head, the input table; under LoRA
    # 4N (no gradients for the frozen weights) + 6 per adapter parameter.
    n = sum(p.numel() for p in model.parameters())
    n -= model.wpe.weight.numel() if isinstance(model, GPT) else \
        (model.wte.weight.numel() if model.head is not None else 0)
    attn_dim = getattr(model, "attn_dim", model.wte.weight.shape[1])  # NH HS
    weight_flops = 6 * n
    if a.lora_rank:
        add_lora(model, a.lora_rank, a.lora_alpha, a.lora_dropout)
        weight_flops = 4 * n + 6 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    gflop = (weight_flops + 12 * len(model.blocks) * attn_dim * a.seq) / 1e9
    model.to(dev)
    if teacher is not None:
        teacher.to(dev)
    reference = None
    if a.objective == "dpo" and not a.lora_rank:
        reference = copy.deepcopy(model).requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if gpu else {}  # the fused CUDA AdamW, as the seeds use on GPUs
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **fused)
    step_model = torch.compile(model) if a.compile else model
    idx = torch.randint(0, V, (a.batch, a.seq), device=dev)
    tgt = torch.randint(0, V, (a.batch, a.seq), device=dev)
    total = 0.0
    for s in range(a.steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            if a.objective == "dpo":
                loss = dpo_loss(step_model, reference, idx, tgt)
            elif a.objective == "distill":
                loss = distill_loss(step_model, teacher, idx, tgt)
            else:
                loss = step_model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if s > 0:
            total += dt
        print(f"step {s} loss {loss.item():.4f} {dt:.3f}s{' (warm-up)' if s == 0 else ''}", flush=True)
    print(f"peak resident {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"{gflop:.3f} GFLOP per token (the trained model's)")
    if gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB "
              f"(torch.cuda.max_memory_allocated) on {torch.cuda.get_device_name()}")
    tag = a.precision + ("+compile" if a.compile else "") + \
        (f"+lora{a.lora_rank}" + (f"-dropout{a.lora_dropout:g}" if a.lora_dropout else "")
         + ("-bf16-base" if a.base_dtype == "bf16" else "")
         if a.lora_rank else "") + ("+dpo" if a.objective == "dpo" else "") + \
        (f"+distill({a.teacher or a.model})" if a.objective == "distill" else "")
    print(f"torch {torch.__version__} {a.model} B={a.batch} T={a.seq} {tag}: "
          f"{a.batch * a.seq * a.steps / total:.1f} tok/s")


if __name__ == "__main__":
    main()
