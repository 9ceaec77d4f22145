"""DPO and ORPO losses and gradients for tests/train/test_objective.cpp, written from the papers
and TRL's DPOTrainer (loss_type "sigmoid", label smoothing) and ORPOTrainer, on model_ref.py's
PyTorch transformer in float64 (not from lmforge's C++).

Rows 2j and 2j+1 are pair j's chosen and rejected responses after a shared prompt; targets are
-100 on the prompt and padding, so a row's log-likelihood is the sum of log p(target) over its
response. The reference model is the policy with every weight perturbed.
"""

import torch
import torch.nn.functional as F

import model_ref

DPO_BETA, DPO_SMOOTHING, ORPO_LAMBDA = 0.5, 0.1, 0.7


def row_logps(logits, targets):
    mask = targets != -100
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).long().unsqueeze(-1))
    return (lp.squeeze(-1) * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy, ref, tokens, targets):
    logits, _ = policy(tokens, targets)
    with torch.no_grad():
        ref_logits, _ = ref(tokens, targets)
    pi, _ = row_logps(logits, targets)
    r, _ = row_logps(ref_logits, targets)
    z = (pi[0::2] - r[0::2]) - (pi[1::2] - r[1::2])  # TRL: chosen_logratios - rejected_logratios
    losses = (-F.logsigmoid(DPO_BETA * z) * (1 - DPO_SMOOTHING)
              - F.logsigmoid(-DPO_BETA * z) * DPO_SMOOTHING)
    rewards_c = DPO_BETA * (pi[0::2] - r[0::2]).detach()
    rewards_r = DPO_BETA * (pi[1::2] - r[1::2]).detach()
    return losses.mean(), rewards_c, rewards_r


def orpo_loss(policy, tokens, targets):
    logits, _ = policy(tokens, targets)
    lp, n = row_logps(logits, targets)
    a = lp / n  # average log-probabilities (TRL: average_log_prob=True)
    ac, ar = a[0::2], a[1::2]
    log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
    ratio = F.logsigmoid(log_odds)
    V = logits.shape[-1]
    nll = F.cross_entropy(logits[0::2].reshape(-1, V), targets[0::2].reshape(-1).long(),
                          ignore_index=-100)  # the chosen responses' tokens
    return nll - (ORPO_LAMBDA * ratio).mean(), log_odds.detach(), nll.detach()


def make(name="gpt2-tiny", seed=77, B=6, T=16):
    cfg = model_ref.PRESETS[name]
    torch.manual_seed(seed)
    policy, ref, values = model_ref.two_models(
        cfg, lambda norm, shape, value: value + 0.01 * torch.randn(shape))
    out = {}
    for pname, (value, ref_value) in values.items():
        out[pname], out["ref." + pname] = value, ref_value

    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.full((B, T), -100)
    for j in range(B // 2):
        prompt = 2 + 3 * j  # prompt tokens, shared by the pair
        tokens[2 * j + 1, :prompt] = tokens[2 * j, :prompt]
        for side in range(2):
            row = 2 * j + side
            end = T - (2 * j + 3 * side) % 5  # some rows end in padding
            targets[row, prompt - 1:end - 1] = tokens[row, prompt:end]
    out["tokens"] = tokens.to(torch.int32)
    out["targets"] = targets.to(torch.int32)

    loss, rc, rr = dpo_loss(policy, ref, tokens, targets)
    loss.backward()
    out["dpo.loss"] = loss.detach().float().view(1)
    out["dpo.reward_chosen"] = rc.float().contiguous()
    out["dpo.reward_rejected"] = rr.float().contiguous()
    for pname, p in policy.named_parameters():
        out["dpo.grad." + pname] = p.grad.float().contiguous()
        p.grad = None

    loss, log_odds, nll = orpo_loss(policy, tokens, targets)
    loss.backward()
    out["orpo.loss"] = loss.detach().float().view(1)
    out["orpo.log_odds"] = log_odds.float().contiguous()
    out["orpo.nll"] = nll.float().view(1)
    for pname, p in policy.named_parameters():
        out["orpo.grad." + pname] = p.grad.float().contiguous()
    hyper = {"preset": name, "dpo_beta": DPO_BETA, "dpo_label_smoothing": DPO_SMOOTHING,
             "orpo_lambda": ORPO_LAMBDA}
    return out, hyper
