"""PyTorch references for every op in src/lmforge/backend/ops.h.

Each case draws float32 inputs and a random upstream gradient `dout`, evaluates the op with
torch in float64 (so the reference is the exact answer for those fp32 inputs, and the error a
test reports is lmforge's alone), and takes input/parameter gradients by autograd. Results are
stored as float32 under "<case>.<tensor>"; each case's scalar arguments (eps, head counts, rope
config) go into the file metadata "cases" so the C++ test can walk the cases by themselves.

Conventions mirrored from backend/cpu/kernels.h:
  linear     out (N, OC) = x (N, C) weight (OC, C)^T + bias (OC)
  rope       HF rotate_half: element i pairs with i + HS/2, applied to the q and k heads of a
             fused qkv row [q heads | k heads | v heads]
  attention  causal; query head h reads kv head h // (NH / NKV)
  packed     rows holding several documents: per-token positions (HF's position_ids) for the
             learned and rotary position embeddings, and attention only within a document
             (a block-diagonal causal mask); the op takes doc_start, each token's document start
  swiglu     x (N, 2F) = [gate | up] -> silu(gate) * up
  geglu      x (N, 2F) = [gate | up] -> gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh)
  xent       mean over targets != ignore_index, as F.cross_entropy
"""

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def rope_inv_freq(theta, head_size, scaling=None):
    """inv_freq (HS/2,) float64, as HF ROPE_INIT_FUNCTIONS["default"] / ["llama3"].

    The "llama3" branch follows transformers' _compute_llama3_parameters: wavelengths shorter
    than old_len / high_freq_factor keep their frequency, longer than old_len / low_freq_factor
    are divided by factor, and the band between is interpolated smoothly.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    if not scaling or scaling["factor"] == 0:
        return inv
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_llama)


def rope_cos_sin(inv_freq, positions):
    """cos, sin (T, HS) float64 in the HF layout: emb = cat(freqs, freqs)."""
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, H, T, HS); cos/sin (T, HS)."""
    return x * cos + rotate_half(x) * sin


def split_qkv(qkv, n_head, n_kv_head):
    """qkv (B, T, (NH + 2 NKV) HS) -> q (B, NH, T, HS), k, v (B, NKV, T, HS)."""
    B, T, Cq = qkv.shape
    hs = Cq // (n_head + 2 * n_kv_head)
    q, k, v = qkv.split([n_head * hs, n_kv_head * hs, n_kv_head * hs], dim=-1)
    heads = lambda t, n: t.view(B, T, n, hs).transpose(1, 2)  # noqa: E731
    return heads(q, n_head), heads(k, n_kv_head), heads(v, n_kv_head)


def merge_qkv(q, k, v):
    B, _, T, hs = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(B, T, -1)  # noqa: E731
    return torch.cat([flat(q), flat(k), flat(v)], dim=-1)


def causal_attention(q, k, v, window=0, doc_ids=None, scale_dim=0, softcap=0.0):
    """q (B, NH, T, HS), k/v (B, NKV, T, HS) -> out (B, T, NH HS), probs (B, NH, T, T).
    window > 0: query t sees keys t - window < j <= t (HF's sliding-window mask). doc_ids (B, T):
    query t sees only keys of its own document. scale_dim > 0: scores scaled by scale_dim^-1/2
    instead of HS^-1/2; softcap > 0: scores soft-capped, softcap tanh(s / softcap) (Gemma 2's
    eager attention in transformers), the softmax and output written out instead of SDPA's."""
    B, NH, T, hs = q.shape
    group = NH // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if window:
        mask &= torch.ones(T, T, dtype=torch.bool).triu(-(window - 1))
    if doc_ids is not None:
        mask = mask[None, None] & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(scale_dim or hs)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    if scale_dim or softcap:
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(B, T, NH * hs), probs


# --- cases ---------------------------------------------------------------------------------


class Writer:
    """Collects "<case>.<name>" float32/int32 tensors and the per-case metadata."""

    def __init__(self):
        self.tensors = {}
        self.cases = {}

    def case(self, name, op, **meta):
        assert name not in self.cases, name
        self.cases[name] = {"op": op, **meta}
        return lambda key, t: self._put(f"{name}.{key}", t)

    def _put(self, key, t):
        t = t.detach()
        t = t.to(torch.int32) if not t.is_floating_point() else t.to(torch.float32)
        self.tensors[key] = t.contiguous()


def _randn(*shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, dtype=torch.float32) * scale + shift


def _run(put, inputs, fn, grad_names):
    """Evaluates fn on float64 copies of the fp32 `inputs`; saves inputs, outputs, dout, grads.

    fn returns a dict of outputs; the first one is the differentiable "out". grad_names maps an
    input name to the name of its saved gradient.
    """
    leaves = {k: v.double().requires_grad_(k in grad_names) for k, v in inputs.items()}
    outs = fn(**leaves)
    out = outs["out"]
    dout = _randn(*out.shape)
    grads = torch.autograd.grad(out, [leaves[k] for k in grad_names], dout.double())
    for k, v in inputs.items():
        put(k, v)
    for k, v in outs.items():
        put(k, v)
    put("dout", dout)
    for k, g in zip(grad_names, grads):
        put(grad_names[k], g)


def linear_cases(w):
    B, T, C, OC = 2, 5, 8, 12
    for name, bias in (("linear_bias", True), ("linear_nobias", False)):
        put = w.case(name, "linear")
        inputs = {"x": _randn(B, T, C), "weight": _randn(OC, C, scale=0.5)}
        grad_names = {"x": "dx", "weight": "dweight"}
        if bias:
            inputs["bias"] = _randn(OC, scale=0.5)
            grad_names["bias"] = "dbias"
        _run(put, inputs, lambda x, weight, bias=None: {"out": F.linear(x, weight, bias)},
             grad_names)


def packed_rows(B, T, seed_lengths):
    """Rows of whole documents of the given lengths (cycled) -> doc_ids, positions, doc_start
    (B, T) int64: the document of each token, its position in it, its document's first index."""
    doc = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        t, d, i = 0, 0, b
        while t < T:
            n = min(seed_lengths[i % len(seed_lengths)], T - t)
            doc[b, t:t + n] = d
            t, d, i = t + n, d + 1, i + 1
    pos = torch.zeros(B, T, dtype=torch.int64)
    start = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        for t in range(1, T):
            same = doc[b, t] == doc[b, t - 1]
            pos[b, t] = pos[b, t - 1] + 1 if same else 0
            start[b, t] = start[b, t - 1] if same else t
    return doc, pos, start


def embedding_cases(w):
    B, T, C, V, maxT = 2, 5, 8, 7, 9  # V < B*T: token ids repeat, so dwte rows add up
    for name, learned in (("embedding", True), ("embedding_nopos", False)):
        put = w.case(name, "embedding")
        tokens = torch.randint(0, V, (B, T))
        tokens[0, :2] = 3  # at least one repeat
        inputs = {"wte": _randn(V, C)}
        grad_names = {"wte": "dwte"}
        if learned:
            inputs["wpe"] = _randn(maxT, C)  # more rows than T: the rest must get no gradient
            grad_names["wpe"] = "dwpe"

        def fn(wte, wpe=None):
            out = F.embedding(tokens, wte)
            if wpe is not None:
                out = out + wpe[:T][None]
            return {"out": out}

        put("tokens", tokens)
        _run(put, inputs, fn, grad_names)

    # Packed rows: wpe by each token's position in its document (positions repeat, so dwpe rows
    # add up across documents).
    put = w.case("embedding_packed", "embedding")
    tokens = torch.randint(0, V, (B, T))
    _, positions, _ = packed_rows(B, T, [2, 3, 1])
    put("tokens", tokens)
    put("positions", positions)
    _run(put, {"wte": _randn(V, C), "wpe": _randn(maxT, C)},
         lambda wte, wpe: {"out": F.embedding(tokens, wte) + F.embedding(positions, wpe)},
         {"wte": "dwte", "wpe": "dwpe"})


def norm_cases(w):
    B, T, C, eps = 2, 5, 16, 1e-5
    for name, bias in (("layernorm", True), ("layernorm_nobias", False)):
        put = w.case(name, "layernorm", eps=eps)
        inputs = {"x": _randn(B, T, C, scale=2.0, shift=0.7), "weight": _randn(C, shift=1.0)}
        grad_names = {"x": "dx", "weight": "dweight"}
        if bias:
            inputs["bias"] = _randn(C, scale=0.5)
            grad_names["bias"] = "dbias"

        def fn(x, weight, bias=None):
            mean = x.mean(-1)
            var = x.var(-1, unbiased=False)
            out = F.layer_norm(x, (C,), weight, bias, eps)
            return {"out": out, "mean": mean, "rstd": (var + eps).rsqrt()}

        _run(put, inputs, fn, grad_names)

    put = w.case("rmsnorm", "rmsnorm", eps=eps)

    def rms(x, weight):  # HF LlamaRMSNorm
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return {"out": x * rstd * weight, "rstd": rstd.squeeze(-1)}

    inputs = {"x": _randn(B, T, C, scale=2.0, shift=0.7), "weight": _randn(C, shift=1.0)}
    _run(put, inputs, rms, {"x": "dx", "weight": "dweight"})

    # Qwen3's q/k norm: RMSNorm over each head of the q and k parts of qkv; v passes through.
    NH, NKV, HS = 4, 2, 8
    put = w.case("qk_norm", "qk_norm", eps=eps, n_head=NH, n_kv_head=NKV)

    def qk(qkv, wq, wk):
        q, k, v = split_qkv(qkv, NH, NKV)
        q, k = rms(q, wq)["out"], rms(k, wk)["out"]
        return {"out": merge_qkv(q, k, v)}

    inputs = {"qkv": _randn(B, T, (NH + 2 * NKV) * HS, scale=2.0, shift=0.3),
              "wq": _randn(HS, shift=1.0), "wk": _randn(HS, shift=1.0)}
    _run(put, inputs, qk, {"qkv": "dqkv", "wq": "dwq", "wk": "dwk"})


def rope_cases(w):
    B, T = 2, 5
    configs = [
        # name, NH, NKV, HS, theta, pos0, scaling
        ("rope", 4, 2, 16, 10000.0, 0, None),
        ("rope_mha_pos0", 2, 2, 8, 10000.0, 11, None),
        # A small original context so that all three llama3 bands (kept, interpolated, divided)
        # occur with HS=16, and pos0 > 0.
        ("rope_llama3_bands", 4, 2, 16, 500000.0, 7,
         {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}),
        # Llama 3.1's own numbers, far into the sequence.
        ("rope_llama31", 4, 1, 64, 500000.0, 4000,
         {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}),
    ]
    for name, NH, NKV, HS, theta, pos0, scaling in configs:
        meta = {"n_head": NH, "n_kv_head": NKV, "head_size": HS, "rope_theta": theta,
                "pos0": pos0, "max_seq_len": pos0 + T + 3}
        if scaling:
            meta["rope_scaling"] = scaling
        put = w.case(name, "rope", **meta)
        cos, sin = rope_cos_sin(rope_inv_freq(theta, HS, scaling), torch.arange(pos0, pos0 + T))

        def fn(qkv, NH=NH, NKV=NKV, cos=cos, sin=sin):
            q, k, v = split_qkv(qkv, NH, NKV)
            return {"out": merge_qkv(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)}

        _run(put, {"qkv": _randn(B, T, (NH + 2 * NKV) * HS)}, fn, {"qkv": "dqkv"})

    # Packed rows: each token rotated by its position in its document (HF's position_ids).
    NH, NKV, HS, theta = 4, 2, 16, 10000.0
    T = 9
    put = w.case("rope_packed", "rope", n_head=NH, n_kv_head=NKV, head_size=HS, rope_theta=theta,
                 pos0=0, max_seq_len=T)
    _, positions, _ = packed_rows(B, T, [4, 2, 5])
    put("positions", positions)
    inv = rope_inv_freq(theta, HS)

    def packed(qkv):
        q, k, v = split_qkv(qkv, NH, NKV)
        freqs = positions.to(torch.float64)[..., None] * inv  # (B, T, HS/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]      # (B, 1, T, HS)
        cos, sin = emb.cos(), emb.sin()
        return {"out": merge_qkv(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)}

    _run(put, {"qkv": _randn(B, T, (NH + 2 * NKV) * HS)}, packed, {"qkv": "dqkv"})


def attention_cases(w):
    HS = 8
    # T = 45: rows of 8-lane vector blocks and a tail in the kernels' exp (T = 7 only has tails).
    for name, B, T, NH, NKV, window in (("attention_gqa", 2, 7, 4, 2, 0),
                                        ("attention_mha", 2, 7, 3, 3, 0),
                                        ("attention_mqa", 2, 7, 4, 1, 0),
                                        ("attention_window3", 2, 7, 4, 2, 3),
                                        ("attention_long", 1, 45, 2, 1, 0)):
        put = w.case(name, "attention", n_head=NH, n_kv_head=NKV, window=window)

        def fn(qkv, NH=NH, NKV=NKV, window=window):
            out, probs = causal_attention(*split_qkv(qkv, NH, NKV), window)
            return {"out": out, "probs": probs}

        # scale 2: scores of order 1-10, so the softmax is far from uniform
        _run(put, {"qkv": _randn(B, T, (NH + 2 * NKV) * HS, scale=2.0)}, fn, {"qkv": "dqkv"})

    # Gemma's scores: scaled by 12^-1/2 (not HS = 8), soft-capped at 3 (inputs of scale 2 give
    # scores of order 1-10: the cap bends most of them); one case with a window over 45 positions.
    for name, B, T, NH, NKV, window in (("attention_softcap", 2, 7, 4, 2, 0),
                                        ("attention_softcap_window", 1, 45, 2, 1, 9)):
        put = w.case(name, "attention", n_head=NH, n_kv_head=NKV, window=window, scale_dim=12,
                     softcap=3.0)

        def fn(qkv, NH=NH, NKV=NKV, window=window):
            out, probs = causal_attention(*split_qkv(qkv, NH, NKV), window, None, 12, 3.0)
            return {"out": out, "probs": probs}

        _run(put, {"qkv": _randn(B, T, (NH + 2 * NKV) * HS, scale=2.0)}, fn, {"qkv": "dqkv"})

    # Packed rows: attention within each document only. T = 300 spans several query tiles (64)
    # and key tiles (128) of the CPU kernel, with documents crossing tile edges, short ones and
    # single tokens; one case adds a sliding window.
    for name, B, T, NH, NKV, window, lengths in (
            ("attention_packed", 2, 11, 4, 2, 0, [3, 1, 5]),
            ("attention_packed_window", 2, 11, 4, 2, 2, [4, 6]),
            ("attention_packed_long", 2, 300, 2, 1, 0, [70, 1, 150, 9, 64, 129])):
        put = w.case(name, "attention", n_head=NH, n_kv_head=NKV, window=window)
        doc, _, start = packed_rows(B, T, lengths)
        put("doc_start", start)

        def fn(qkv, NH=NH, NKV=NKV, window=window, doc=doc):
            out, probs = causal_attention(*split_qkv(qkv, NH, NKV), window, doc)
            return {"out": out, "probs": probs}

        _run(put, {"qkv": _randn(B, T, (NH + 2 * NKV) * HS, scale=2.0)}, fn, {"qkv": "dqkv"})


def activation_cases(w):
    B, T, F_ = 2, 5, 12
    put = w.case("gelu", "gelu")
    _run(put, {"x": _randn(B, T, F_, scale=2.5)},
         lambda x: {"out": F.gelu(x, approximate="tanh")}, {"x": "dx"})

    put = w.case("swiglu", "swiglu")

    def swiglu(x):
        gate, up = x.chunk(2, dim=-1)
        return {"out": F.silu(gate) * up}

    _run(put, {"x": _randn(B, T, 2 * F_, scale=2.5)}, swiglu, {"x": "dx"})

    put = w.case("geglu", "geglu")

    def geglu(x):
        gate, up = x.chunk(2, dim=-1)
        return {"out": F.gelu(gate, approximate="tanh") * up}

    _run(put, {"x": _randn(B, T, 2 * F_, scale=2.5)}, geglu, {"x": "dx"})


def add_case(w):
    put = w.case("add", "add")  # the residual add; its backward passes dout to both (accumulate)
    _run(put, {"a": _randn(2, 5, 8), "b": _randn(2, 5, 8)}, lambda a, b: {"out": a + b},
         {"a": "da", "b": "db"})


def xent_case(w):
    # V = 37: the vector kernels' masked tail alone; 1000: their unrolled body, then the tail;
    # 5: under one vector of either width; 49: the 32-wide unrolled body, then two tail steps.
    for name, (B, T, V) in {"xent": (2, 6, 37), "xent_wide": (2, 3, 1000), "xent_v5": (2, 3, 5),
                            "xent_v49": (2, 3, 49)}.items():
        _xent_case(w, name, B, T, V)


def _xent_case(w, name, B, T, V):
    put = w.case(name, "softmax_xent", ignore_index=IGNORE_INDEX)
    logits = _randn(B, T, V, scale=3.0)
    targets = torch.randint(0, V, (B, T))
    targets[0, 1] = targets[1, T - 2] = targets[1, T - 1] = IGNORE_INDEX
    x = logits.double().requires_grad_(True)
    losses = F.cross_entropy(x.view(-1, V), targets.view(-1), ignore_index=IGNORE_INDEX,
                             reduction="none")
    loss = F.cross_entropy(x.view(-1, V), targets.view(-1), ignore_index=IGNORE_INDEX)
    dloss = _randn(1, shift=1.0)  # upstream gradient of the mean loss
    (dlogits,) = torch.autograd.grad(loss, [x], dloss.double()[0])
    for k, v in {"logits": logits, "targets": targets, "losses": losses.view(B, T),
                 "loss": loss.view(1), "dloss": dloss, "dlogits": dlogits}.items():
        put(k, v)


def sum_squares_case(w):
    put = w.case("sum_squares", "sum_squares")  # global-norm gradient clipping
    x = _randn(3, 1000, scale=0.1)
    put("x", x)
    put("out", x.double().pow(2).sum().view(1))


def make(seed=1234):
    torch.manual_seed(seed)
    w = Writer()
    for fn in (linear_cases, embedding_cases, norm_cases, rope_cases, attention_cases,
               activation_cases, add_case, xent_case, sum_squares_case):
        fn(w)
    return w.tensors, w.cases
