"""torch.optim.AdamW reference: a few parameters, three steps with given gradients.

Two param groups: decayed matrices (weight_decay 0.1) and undecayed vectors (weight_decay 0),
as lmforge's Param::decay. The learning rate changes between steps, as a schedule would.
Saved: "param.<name>" (initial), and for step s = 1, 2, 3: "grad.<s>.<name>", "lr.<s>" and the
state after the step, "after.<s>.<name>", "m.<s>.<name>", "v.<s>.<name>". Step 2 clips the
gradients first (torch.nn.utils.clip_grad_norm_ to "max_norm.2", below their norm); its saved
gradients are the unclipped ones.

bf16 master weights ("sr." prefix): the same parameters drawn again and stored in bf16
("sr.param.<name>", BF16), one AdamW step at LRS[0] computed in fp32 on their exact fp32 values
with gradients "sr.grad.<name>": "sr.after.<name>" (fp32, before any rounding), "sr.m.<name>",
"sr.v.<name>". lmforge's bf16 master update must give one of the two bf16 neighbours of
sr.after, and the same moments.

Muon ("muon.<variant>." prefix): torch.optim.Muon on the blocks' matrices (tall, wide, square)
and torch.optim.AdamW on the rest (a norm weight, the embeddings, the head), as lmforge splits
them with train.optimizer: muon, for three steps with the same learning rates and clipping as
above. Everything is float64, and so is the Newton-Schulz iteration: torch's runs in bf16, so its
function is swapped for the same iteration in float64 (checked against torch's own within bf16's
error). Saved per variant: "param.<name>", "grad.<s>.<name>", "after.<s>.<name>",
"m.<s>.<name>" (AdamW's first moment, or Muon's momentum buffer), "v.<s>.<name>" (AdamW's
only) and, per Muon matrix, "bf16_off.<s>.<name>": how far torch's update with its own bf16
iteration is from the float64 one on the same step's direction. The variants' options are in the
"muon" metadata.
"""

import math

import torch
import torch.optim._muon as torch_muon

BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1
LRS = [1e-3, 3e-4, 2e-3]
CLIP_STEP, MAX_NORM = 2, 0.5

# name, shape, decay, gradient scale per step
PARAMS = [
    ("a.weight", (8, 5), True, 1.0),
    ("a.bias", (5,), False, 0.1),
    ("norm.weight", (5,), False, 1e-3),
    ("b.weight", (3, 4), True, 1e-9),  # gradients below eps: eps dominates the denominator
]


def make(seed=99):
    torch.manual_seed(seed)
    out, meta = {}, []
    params = []
    for name, shape, decay, gscale in PARAMS:
        value = torch.randn(shape) + (1.0 if name.startswith("norm") else 0.0)
        out["param." + name] = value.clone()
        params.append(torch.nn.Parameter(value))
        meta.append({"name": name, "shape": list(shape), "decay": decay})
    groups = [
        {"params": [p for p, spec in zip(params, PARAMS) if spec[2]],
         "weight_decay": WEIGHT_DECAY},
        {"params": [p for p, spec in zip(params, PARAMS) if not spec[2]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LRS[0], betas=BETAS, eps=EPS, foreach=False,
                            fused=False)
    for step, lr in enumerate(LRS, start=1):
        for g in opt.param_groups:
            g["lr"] = lr
        for p, (name, shape, _, gscale) in zip(params, PARAMS):
            grad = torch.randn(shape) * gscale
            if step == 2 and name == "a.weight":
                grad[0] = 0.0  # a zero gradient row: only decay and momentum move it
            p.grad = grad
            out[f"grad.{step}.{name}"] = grad.clone()
        if step == CLIP_STEP:
            norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            assert norm > MAX_NORM, "the clipped step must clip"
            out[f"max_norm.{step}"] = torch.tensor([MAX_NORM], dtype=torch.float64)
        opt.step()
        out[f"lr.{step}"] = torch.tensor([lr], dtype=torch.float64)
        for p, (name, *_) in zip(params, PARAMS):
            st = opt.state[p]
            out[f"after.{step}.{name}"] = p.detach().clone()
            out[f"m.{step}.{name}"] = st["exp_avg"].clone()
            out[f"v.{step}.{name}"] = st["exp_avg_sq"].clone()
    make_bf16_master(out, seed + 1)
    hyper = {"beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "weight_decay": WEIGHT_DECAY,
             "steps": len(LRS), "params": meta}
    return out, hyper


# name, shape, decay, row blocks: Muon takes the blocks' matrices, AdamW the rest. A matrix with
# row blocks is lmforge's fused q/k/v or gate/up: torch.optim.Muon sees each block as its own
# parameter (a Hugging Face Llama's q_proj, k_proj, v_proj; gate_proj, up_proj).
MUON_PARAMS = [
    ("blocks.0.attn.qkv.weight", (12, 4), True, [6, 3, 3]),  # q tall (torch transposes it), k, v wide
    ("blocks.0.mlp.fc.weight", (4, 10), True, [2, 2]),  # gate and up, wide
    ("blocks.0.attn.proj.weight", (6, 6), True, None),
    ("blocks.0.mlp.proj.weight", (10, 4), True, None),  # tall, whole
    ("blocks.0.ln_1.weight", (4,), False, None),
    ("tok_emb.weight", (10, 4), False, None),
    ("lm_head.weight", (10, 4), True, None),
]
MUON_VARIANTS = {
    # Moonlight's: AdamW's lr carries over.
    "a": {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr": "match_rms_adamw",
          "lr_ratio": 1.0},
    # Keller Jordan's scaling with its own, larger lr; plain momentum, fewer iterations.
    "b": {"momentum": 0.9, "nesterov": False, "ns_steps": 3, "adjust_lr": "original",
          "lr_ratio": 20.0},
}


def newton_schulz_f64(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz, in float64 instead of bf16."""
    a, b, c = ns_coefficients
    x = grad.double()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if grad.size(0) > grad.size(1):
        x = x.T
    return x


def check_against_torch_bf16():
    """The float64 iteration is torch's: on random matrices both agree within bf16's error."""
    gen = torch.Generator().manual_seed(5)
    coeffs = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
    for shape in [(12, 4), (4, 10), (6, 6)]:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        ours = newton_schulz_f64(g, coeffs, 5, torch_muon.EPS)
        theirs = torch_muon._zeropower_via_newtonschulz(g, coeffs, 5, torch_muon.EPS).double()
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        assert rel < 0.03, f"float64 Newton-Schulz differs from torch's by {rel} on {shape}"


def make_muon(out, seed=123):
    check_against_torch_bf16()
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = newton_schulz_f64
    try:
        for tag, opts in MUON_VARIANTS.items():
            run_muon(out, f"muon.{tag}.", opts, seed, original)
    finally:
        torch_muon._zeropower_via_newtonschulz = original
    meta = [{"name": n, "shape": list(sh), "decay": d, "row_blocks": rows or []}
            for n, sh, d, rows in MUON_PARAMS]
    return {"variants": MUON_VARIANTS, "params": meta}


def run_muon(out, prefix, opts, seed, zeropower_bf16):
    torch.manual_seed(seed)
    params = {}  # name: its torch parameters (one per row block)
    for name, shape, _, rows in MUON_PARAMS:
        value = torch.randn(shape, dtype=torch.float64) * 0.5 + (1.0 if "ln_" in name else 0.0)
        out[prefix + "param." + name] = value.clone()
        params[name] = [torch.nn.Parameter(v.clone()) for v in value.split(rows or [shape[0]])]
    is_muon = {n: len(sh) == 2 and n.startswith("blocks.") for n, sh, _, _ in MUON_PARAMS}
    muon = torch.optim.Muon([b for n in params if is_muon[n] for b in params[n]], lr=LRS[0],
                            weight_decay=WEIGHT_DECAY, momentum=opts["momentum"],
                            nesterov=opts["nesterov"], ns_steps=opts["ns_steps"],
                            adjust_lr_fn=opts["adjust_lr"])
    groups = [
        {"params": [params[n][0] for n, _, d, _ in MUON_PARAMS if not is_muon[n] and d],
         "weight_decay": WEIGHT_DECAY},
        {"params": [params[n][0] for n, _, d, _ in MUON_PARAMS if not is_muon[n] and not d],
         "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=LRS[0], betas=BETAS, eps=EPS, foreach=False,
                              fused=False)
    for step, lr in enumerate(LRS, start=1):
        for g in muon.param_groups:
            g["lr"] = lr * opts["lr_ratio"]
        for g in adamw.param_groups:
            g["lr"] = lr
        for name, shape, _, rows in MUON_PARAMS:
            grad = torch.randn(shape, dtype=torch.float64)
            for b, gb in zip(params[name], grad.split(rows or [shape[0]])):
                b.grad = gb.clone()
            out[f"{prefix}grad.{step}.{name}"] = grad.clone()
        if step == CLIP_STEP:
            norm = torch.nn.utils.clip_grad_norm_([b for bs in params.values() for b in bs],
                                                  MAX_NORM)
            assert norm > MAX_NORM, "the clipped step must clip"
        muon.step()
        adamw.step()
        # torch's own update with its bf16 iteration on the same direction, the measure of bf16's
        # error here: lmforge's bf16 products are checked against float64 within a multiple of it.
        group = muon.param_groups[0]
        for name, blocks in params.items():
            if not is_muon[name]:
                continue
            deltas = []
            for b in blocks:
                buf, g = muon.state[b]["momentum_buffer"], b.grad
                u = g.lerp(buf, opts["momentum"]) if opts["nesterov"] else buf
                args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
                off = zeropower_bf16(u, *args).double() - newton_schulz_f64(u, *args)
                deltas.append(-torch_muon._adjust_lr(group["lr"], opts["adjust_lr"], b.shape) * off)
            out[f"{prefix}bf16_off.{step}.{name}"] = torch.cat(deltas)
        for name, blocks in params.items():
            out[f"{prefix}after.{step}.{name}"] = torch.cat([b.detach() for b in blocks])
            if is_muon[name]:
                out[f"{prefix}m.{step}.{name}"] = torch.cat(
                    [muon.state[b]["momentum_buffer"] for b in blocks])
            else:
                out[f"{prefix}m.{step}.{name}"] = adamw.state[blocks[0]]["exp_avg"].clone()
                out[f"{prefix}v.{step}.{name}"] = adamw.state[blocks[0]]["exp_avg_sq"].clone()


def make_bf16_master(out, seed):
    torch.manual_seed(seed)
    params = []
    for name, shape, decay, gscale in PARAMS:
        value = (torch.randn(shape) + (1.0 if name.startswith("norm") else 0.0)).bfloat16()
        out["sr.param." + name] = value.clone()
        p = torch.nn.Parameter(value.float())
        p.grad = torch.randn(shape) * gscale
        out["sr.grad." + name] = p.grad.clone()
        params.append(p)
    groups = [
        {"params": [p for p, spec in zip(params, PARAMS) if spec[2]],
         "weight_decay": WEIGHT_DECAY},
        {"params": [p for p, spec in zip(params, PARAMS) if not spec[2]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LRS[0], betas=BETAS, eps=EPS, foreach=False, fused=False)
    opt.step()
    for p, (name, *_) in zip(params, PARAMS):
        out["sr.after." + name] = p.detach().clone()
        out["sr.m." + name] = opt.state[p]["exp_avg"].clone()
        out["sr.v." + name] = opt.state[p]["exp_avg_sq"].clone()
