"""Knowledge distillation's loss and gradients for tests/train/test_objective.cpp, written from
Hinton et al. 2015 (the KL term scaled by T^2, as in DistilBERT and the common trainers) on
model_ref.py's PyTorch transformer in float64 (not from lmforge's C++):

  loss = mean over target tokens of (1 - alpha) CE + alpha T^2 KL(softmax(t / T) || softmax(s / T))

The teacher is a second gpt2-tiny with its own random weights, its logits sharpened (weights x3)
so that its distribution differs from the student's.
"""

import torch
import torch.nn.functional as F

import model_ref

ALPHA, TEMPERATURE = 0.7, 2.0


def make(name="gpt2-tiny", seed=91, B=3, T=16, logit_softcap=0.0):
    """logit_softcap > 0: both models' logits soft-capped, cap tanh(z / cap) (Gemma 2's)."""
    cfg = model_ref.PRESETS[name]
    torch.manual_seed(seed)
    student, teacher, values = model_ref.two_models(
        cfg, lambda norm, shape, value: (3.0 + 0.3 * torch.randn(shape)) if norm
        else 0.02 * torch.randn(shape))
    out = {}
    for pname, (value, teacher_value) in values.items():
        out[pname], out["teacher." + pname] = value, teacher_value

    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    targets[0, :4] = -100  # a prompt, and padding
    targets[2, T - 5:] = -100
    logits, _ = student(tokens, targets)
    with torch.no_grad():
        teacher_logits, _ = teacher(tokens, targets)
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
        teacher_logits = logit_softcap * torch.tanh(teacher_logits / logit_softcap)
    mask = (targets != -100).reshape(-1)
    V = logits.shape[-1]
    s, t, y = logits.reshape(-1, V)[mask], teacher_logits.reshape(-1, V)[mask], targets.reshape(-1)[mask]
    ce = F.cross_entropy(s, y.long(), reduction="none")
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                  log_target=True, reduction="none").sum(-1)
    loss = ((1 - ALPHA) * ce + ALPHA * TEMPERATURE ** 2 * kl).mean()
    loss.backward()
    out["tokens"] = tokens.to(torch.int32)
    out["targets"] = targets.to(torch.int32)
    out["loss"] = loss.detach().float().view(1)
    out["kl"] = kl.mean().detach().float().view(1)
    for pname, p in student.named_parameters():
        out["grad." + pname] = p.grad.float().contiguous()
    return out, {"preset": name, "alpha": ALPHA, "temperature": TEMPERATURE,
                 "logit_softcap": logit_softcap}
