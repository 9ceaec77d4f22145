"""A PyTorch decoder-only transformer for GPT-2 and Llama 3, written from the papers / HF
modeling code (not from lmforge's C++), with lmforge's parameter names and layouts:

  tok_emb.weight (V, C)              pos_emb.weight (maxT, C)            (learned positions)
  blocks.{l}.norm1.weight/.bias      blocks.{l}.attn.qkv.weight (Cq, C)  rows [q | k | v] heads
  blocks.{l}.attn.proj.weight (C, C) blocks.{l}.norm2.weight/.bias
  blocks.{l}.mlp.fc.weight (F or 2F, C)  rows [gate | up] for SwiGLU
  blocks.{l}.mlp.proj.weight (C, F)  norm_f.weight/.bias                 lm_head.weight (untied)

Pre-norm blocks: x = x + attn(norm1(x)); x = x + mlp(norm2(x)).
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops_ref import apply_rope, rope_cos_sin, rope_inv_freq


@dataclass
class Config:
    vocab_size: int
    max_seq_len: int
    n_layer: int
    n_head: int
    n_kv_head: int  # effective: equals n_head without GQA
    n_embd: int
    ffn_hidden: int  # effective F
    norm: str  # layernorm | rmsnorm
    norm_eps: float
    mlp: str  # gelu | swiglu
    pos: str  # learned | rope
    rope_theta: float
    bias: bool
    tie_embeddings: bool

    def to_json(self):
        return asdict(self)


# Mirrors src/lmforge/models/presets.cpp; the C++ test checks every field against model_preset().
PRESETS = {
    "gpt2-tiny": Config(vocab_size=50257, max_seq_len=256, n_layer=4, n_head=4, n_kv_head=4,
                        n_embd=128, ffn_hidden=512, norm="layernorm", norm_eps=1e-5, mlp="gelu",
                        pos="learned", rope_theta=10000.0, bias=True, tie_embeddings=True),
    "llama3-tiny": Config(vocab_size=128256, max_seq_len=256, n_layer=4, n_head=4, n_kv_head=2,
                          n_embd=128, ffn_hidden=352, norm="rmsnorm", norm_eps=1e-5,
                          mlp="swiglu", pos="rope", rope_theta=10000.0, bias=False,
                          tie_embeddings=False),
}


class Norm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.rms, self.eps = cfg.norm == "rmsnorm", cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        has_bias = cfg.bias and not self.rms
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if has_bias else None

    def forward(self, x):
        if self.rms:  # HF LlamaRMSNorm
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hs = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (self.nh + 2 * self.nkv) * self.hs, bias=cfg.bias)
        self.proj = nn.Linear(self.nh * self.hs, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs],
                                    dim=-1)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k.repeat_interleave(self.nh // self.nkv, dim=1)  # GQA: head h reads kv head h // g
        v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.ffn_hidden
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = Norm(cfg), Attention(cfg)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, tokens, targets):
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T))
        else:
            inv = rope_inv_freq(self.cfg.rope_theta, self.cfg.n_embd // self.cfg.n_head)
            rope = tuple(t.to(x.dtype) for t in rope_cos_sin(inv, torch.arange(T)))
        for block in self.blocks:
            x = block(x, rope)
        x = self.norm_f(x)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = x @ head.t()
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1).long(),
                               ignore_index=-100)
        return logits, loss


def two_models(cfg, second_value):
    """Two models of cfg with random fp32 weights (norm weights 1 + N(0, 0.1), the rest
    N(0, 0.02)) for the first and second_value(name, shape, first's value) for the second, both
    then run in float64. Returns (first, second, {name: value, "<second>." ...} to fill)."""
    first, second = Transformer(cfg), Transformer(cfg)
    values = {}
    for (pname, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        norm = ".norm" in "." + pname and pname.endswith(".weight")
        value = 1.0 + 0.1 * torch.randn(p.shape) if norm else 0.02 * torch.randn(p.shape)
        other = second_value(norm, p.shape, value)
        with torch.no_grad():
            p.copy_(value)
            q.copy_(other)
        values[pname] = (value.contiguous(), other.contiguous())
    return first.double(), second.double(), values


def make(name, seed, B=2, T=16):
    """Returns the tensors of model_<name>.safetensors and its config."""
    cfg = PRESETS[name]
    torch.manual_seed(seed)
    model = Transformer(cfg)
    # Random everything, so a swapped or mislabelled tensor shows: matrices N(0, 0.02), norm
    # weights 1 + N(0, 0.1), biases N(0, 0.02). Drawn in fp32; the model then runs in float64 so
    # the reference is exact for these fp32 values.
    params32 = {}
    for pname, p in model.named_parameters():
        if ".norm" in "." + pname and pname.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(p.shape)
        else:
            value = 0.02 * torch.randn(p.shape)
        params32[pname] = value
        with torch.no_grad():
            p.copy_(value)
    model.double()

    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    targets[0, 3] = targets[1, 0] = targets[1, T - 1] = -100
    logits, loss = model(tokens, targets)
    loss.backward()

    out = {k: v.contiguous() for k, v in params32.items()}
    out["tokens"] = tokens.to(torch.int32)
    out["targets"] = targets.to(torch.int32)
    out["logits"] = logits.detach().float().contiguous()
    out["loss"] = loss.detach().float().view(1)
    for pname, p in model.named_parameters():
        out["grad." + pname] = p.grad.float().contiguous()
    return out, cfg
