"""DPO, ORPO, SimPO and KTO losses and gradients for tests/train/test_objective.cpp, written from
the papers and TRL's DPOTrainer (loss_type "sigmoid" with label smoothing, "hinge", "ipo"),
ORPOTrainer, CPOTrainer (loss_type "simpo" with cpo_alpha) and KTOTrainer (loss_type "kto"),
on model_ref.py's PyTorch transformer in float64 (not from lmforge's C++).

Rows 2j and 2j+1 are pair j's chosen and rejected responses after a shared prompt; targets are
-100 on the prompt and padding, so a row's log-likelihood is the sum of log p(target) over its
response. The reference model is the policy with every weight perturbed.
"""

import copy

import torch
import torch.nn.functional as F

import model_ref

DPO_BETA, DPO_SMOOTHING, ORPO_LAMBDA = 0.5, 0.1, 0.7
IPO_BETA = 0.3
SIMPO_BETA, SIMPO_GAMMA, CPO_ALPHA = 2.0, 0.4, 0.3
SIMPO_SMOOTHING = 0.15  # the "simpo_smooth" case: label smoothing, no NLL term
KTO_BETA, KTO_DESIRABLE_WEIGHT, KTO_UNDESIRABLE_WEIGHT = 0.3, 1.0, 1.33
KTO_LABELS = [1, 0, 0, 1, 1, 0]  # KTO reads each row alone: 1 = a desirable response


def row_logps(logits, targets):
    mask = targets != -100
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).long().unsqueeze(-1))
    return (lp.squeeze(-1) * mask).sum(-1), mask.sum(-1)


def dpo_logratios(policy, ref, tokens, targets, average):
    """TRL's chosen and rejected log-ratios (policy - reference); IPO averages over tokens."""
    logits, _ = policy(tokens, targets)
    with torch.no_grad():
        ref_logits, _ = ref(tokens, targets)
    pi, n = row_logps(logits, targets)
    r, _ = row_logps(ref_logits, targets)
    if average:
        pi, r = pi / n, r / n
    return pi[0::2] - r[0::2], pi[1::2] - r[1::2]


def dpo_loss(policy, ref, tokens, targets, loss_type="sigmoid", beta=DPO_BETA):
    lc, lr = dpo_logratios(policy, ref, tokens, targets, loss_type == "ipo")
    z = lc - lr  # TRL's logits
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * z) * (1 - DPO_SMOOTHING)
                  - F.logsigmoid(-beta * z) * DPO_SMOOTHING)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:  # ipo: eq. 17 of Azar et al.
        losses = (z - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * lc.detach(), beta * lr.detach()


def hinge_beta(policy, ref, tokens, targets):
    """A beta that puts the pairs on both sides of the hinge (1 - beta z = 0): the largest z
    at beta z = 2 (no gradient), the others below half of it (beta z < 1)."""
    with torch.no_grad():
        lc, lr = dpo_logratios(policy, ref, tokens, targets, False)
    z = (lc - lr).sort().values
    assert z[-1] > 0 and z[-2] < z[-1] / 2, z
    return float(2 / z[-1])


def simpo_loss(policy, tokens, targets, smoothing=0.0, alpha=CPO_ALPHA):
    logits, _ = policy(tokens, targets)
    lp, n = row_logps(logits, targets)
    a = lp / n  # TRL's CPO: average_log_prob for simpo
    z = a[0::2] - a[1::2] - SIMPO_GAMMA / SIMPO_BETA
    V = logits.shape[-1]
    nll = F.cross_entropy(logits[0::2].reshape(-1, V), targets[0::2].reshape(-1).long(),
                          ignore_index=-100)
    losses = (-F.logsigmoid(SIMPO_BETA * z) * (1 - smoothing)
              - F.logsigmoid(-SIMPO_BETA * z) * smoothing)
    loss = losses.mean() + alpha * nll
    return loss, SIMPO_BETA * a[0::2].detach(), SIMPO_BETA * a[1::2].detach(), nll.detach()


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


def kl_rows(tokens, targets, group):
    """TRL's KL completions: row i's prompt followed by another row's response, cut to T+1
    tokens, padded with ignored targets. The prompt is the row's tokens through its first target's
    position; the response its tokens after that through its last target, with the targets it
    had. The other row: within each micro-batch of `group` rows, the nearest earlier one
    (cyclically) with a response and another prompt (TRL shifts by one row; its unpaired rows
    never put a prompt's two responses side by side, these rows do), else the row before."""
    B, T = tokens.shape
    kt = torch.zeros_like(tokens)
    ky = torch.full_like(targets, -100)

    def prompt(r):
        t = (targets[r] != -100).nonzero().flatten()
        return None if len(t) == 0 else tokens[r, :int(t[0]) + 1].tolist()

    for i in range(B):
        g0, k = (i // group) * group, i % group
        others = [g0 + (k - d) % group for d in range(1, group)]
        differ = [c for c in others if prompt(c) is not None and prompt(c) != prompt(i)]
        j = differ[0] if differ else g0 + (k - 1) % group
        ti = (targets[i] != -100).nonzero().flatten()
        tj = (targets[j] != -100).nonzero().flatten()
        if len(ti) == 0 or len(tj) == 0:
            continue
        fi, fj, lj = int(ti[0]), int(tj[0]), int(tj[-1])
        # (token, is_target) of the sequence
        seq = [(int(tokens[i, k]), False) for k in range(fi + 1)]
        for k in range(fj, lj + 1):
            is_target = int(targets[j, k]) != -100
            seq.append((int(targets[j, k]) if is_target else int(tokens[j, k + 1]), is_target))
        seq = seq[:T + 1]
        for k, (tok, _) in enumerate(seq[:T]):
            kt[i, k] = tok
        for k in range(1, len(seq)):
            if seq[k][1]:
                ky[i, k - 1] = seq[k][0]
    return kt, ky


def kto_loss(policy, ref, tokens, targets, labels, group):
    """TRL's KTO loss (loss_type "kto"): the KL estimate from the KL completions, detached and
    clamped at 0, then 1 - sigmoid(beta (logratio - kl)) for desirable responses and
    1 - sigmoid(beta (kl - logratio)) for undesirable ones, weighted, averaged over all rows."""
    logits, _ = policy(tokens, targets)
    pi, _ = row_logps(logits, targets)
    with torch.no_grad():
        r, _ = row_logps(ref(tokens, targets)[0], targets)
        kt, ky = kl_rows(tokens, targets, group)
        kl_pi, n = row_logps(policy(kt, ky)[0], ky)
        kl_r, _ = row_logps(ref(kt, ky)[0], ky)
        raw = (kl_pi - kl_r)[n > 0].mean()
        kl = raw.clamp(min=0)
    desirable = torch.tensor(labels, dtype=torch.bool)
    x = pi - r
    chosen = 1 - torch.sigmoid(KTO_BETA * (x[desirable] - kl))
    rejected = 1 - torch.sigmoid(KTO_BETA * (kl - x[~desirable]))
    losses = torch.cat((KTO_DESIRABLE_WEIGHT * chosen, KTO_UNDESIRABLE_WEIGHT * rejected))
    return (losses.mean(), KTO_BETA * x[desirable].detach(), KTO_BETA * x[~desirable].detach(),
            kl, raw)


def kto_apo_loss(policy, ref, tokens, targets, labels):
    """TRL's KTO with loss_type "apo_zero_unpaired" (APO-zero, eq. 7 of D'Oosterlinck et al.):
    1 - sigmoid(beta logratio) for desirable responses, sigmoid(beta logratio) for undesirable
    ones, weighted, averaged over all rows; no KL estimate."""
    logits, _ = policy(tokens, targets)
    pi, _ = row_logps(logits, targets)
    with torch.no_grad():
        r, _ = row_logps(ref(tokens, targets)[0], targets)
    desirable = torch.tensor(labels, dtype=torch.bool)
    x = pi - r
    chosen = 1 - torch.sigmoid(KTO_BETA * x[desirable])
    rejected = torch.sigmoid(KTO_BETA * x[~desirable])
    losses = torch.cat((KTO_DESIRABLE_WEIGHT * chosen, KTO_UNDESIRABLE_WEIGHT * rejected))
    return losses.mean(), KTO_BETA * x[desirable].detach(), KTO_BETA * x[~desirable].detach()


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

    hinge = hinge_beta(policy, ref, tokens, targets)
    for kind, loss_type, beta in (("dpo", "sigmoid", DPO_BETA), ("dpo_hinge", "hinge", hinge),
                                  ("dpo_ipo", "ipo", IPO_BETA)):
        loss, rc, rr = dpo_loss(policy, ref, tokens, targets, loss_type, beta)
        loss.backward()
        out[kind + ".loss"] = loss.detach().float().view(1)
        out[kind + ".reward_chosen"] = rc.float().contiguous()
        out[kind + ".reward_rejected"] = rr.float().contiguous()
        for pname, p in policy.named_parameters():
            out[kind + ".grad." + pname] = p.grad.float().contiguous()
            p.grad = None

    for kind, smoothing, alpha in (("simpo", 0.0, CPO_ALPHA), ("simpo_smooth", SIMPO_SMOOTHING, 0.0)):
        loss, rc, rr, nll = simpo_loss(policy, tokens, targets, smoothing, alpha)
        loss.backward()
        out[kind + ".loss"] = loss.detach().float().view(1)
        out[kind + ".reward_chosen"] = rc.float().contiguous()
        out[kind + ".reward_rejected"] = rr.float().contiguous()
        out[kind + ".nll"] = nll.float().view(1)
        for pname, p in policy.named_parameters():
            out[kind + ".grad." + pname] = p.grad.float().contiguous()
            p.grad = None

    # KTO's reference: the policy with its token embeddings (tied to the LM head) scaled by 1.5,
    # which lowers the log-likelihood of these random tokens: the KL estimate is positive
    # (~0.5). With the DPO cases' reference it is negative and clamps to 0 ("kto_clamp").
    kto_ref = copy.deepcopy(ref)
    with torch.no_grad():
        for (pname, p), (_, q) in zip(policy.named_parameters(), kto_ref.named_parameters()):
            q.copy_((p * 1.5).float() if pname == "tok_emb.weight" else p)  # fp32 values
            out["kto_ref." + pname] = q.float().contiguous()
    out["kto_labels"] = torch.tensor(KTO_LABELS, dtype=torch.int32)
    # The KL rows pair rows within micro-batches of `group` rows.
    for kind, reference, group in (("kto_g6", kto_ref, 6), ("kto_g2", kto_ref, 2),
                                   ("kto_clamp_g2", ref, 2)):
        loss, rc, rr, kl, raw = kto_loss(policy, reference, tokens, targets, KTO_LABELS, group)
        assert (raw > 0.1) if reference is kto_ref else (raw < -0.1), (kind, raw)
        loss.backward()
        out[kind + ".loss"] = loss.detach().float().view(1)
        out[kind + ".reward_chosen"] = rc.float().contiguous()
        out[kind + ".reward_rejected"] = rr.float().contiguous()
        out[kind + ".kl"] = kl.float().view(1)
        for pname, p in policy.named_parameters():
            out[kind + ".grad." + pname] = p.grad.float().contiguous()
            p.grad = None

    loss, rc, rr = kto_apo_loss(policy, kto_ref, tokens, targets, KTO_LABELS)
    loss.backward()
    out["kto_apo_g2.loss"] = loss.detach().float().view(1)
    out["kto_apo_g2.reward_chosen"] = rc.float().contiguous()
    out["kto_apo_g2.reward_rejected"] = rr.float().contiguous()
    for pname, p in policy.named_parameters():
        out["kto_apo_g2.grad." + pname] = p.grad.float().contiguous()
        p.grad = None

    loss, log_odds, nll = orpo_loss(policy, tokens, targets)
    loss.backward()
    out["orpo.loss"] = loss.detach().float().view(1)
    out["orpo.log_odds"] = log_odds.float().contiguous()
    out["orpo.nll"] = nll.float().view(1)
    for pname, p in policy.named_parameters():
        out["orpo.grad." + pname] = p.grad.float().contiguous()
    hyper = {"preset": name, "dpo_beta": DPO_BETA, "dpo_label_smoothing": DPO_SMOOTHING,
             "orpo_lambda": ORPO_LAMBDA, "hinge_beta": hinge, "ipo_beta": IPO_BETA,
             "simpo_beta": SIMPO_BETA, "simpo_gamma": SIMPO_GAMMA, "cpo_alpha": CPO_ALPHA,
             "simpo_label_smoothing": SIMPO_SMOOTHING, "kto_beta": KTO_BETA,
             "kto_desirable_weight": KTO_DESIRABLE_WEIGHT,
             "kto_undesirable_weight": KTO_UNDESIRABLE_WEIGHT}
    return out, hyper
