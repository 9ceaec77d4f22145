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
"""

import torch

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
