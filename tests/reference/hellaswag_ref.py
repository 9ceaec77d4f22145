"""HellaSwag-style multiple-choice scoring with Hugging Face transformers and tokenizers.

    hellaswag_ref.py HF_DIR ITEMS.jsonl SCORES.jsonl

Scores every example of ITEMS.jsonl (HellaSwag's ctx, endings, label) with the model and
tokenizer.json of HF_DIR as nanoGPT's and llm.c's HellaSwag eval does, the ending's tokens split
off as lm-eval-harness does: ctx + " " + ending encoded whole (no special tokens; Gemma-family
models with them, i.e. the post-processor's BOS, as lm-eval-harness adds it for them), the ending's
tokens those after the context's; an ending's score is the sum of its
tokens' log-probabilities given everything before them; a choice longer than the model's
context (max_position_embeddings) keeps its last context + 1 tokens. SCORES.jsonl is lmforge eval's --scores
output for the same files; every ending's log-likelihood and token count must agree (1e-4
relative, fp32 rounding), and so must each prediction (the highest sum, and the highest mean per
token) unless two endings tie within that tolerance. Prints the worst difference; exits 1 on any
mismatch.
"""

import json
import os
import sys

import torch
import transformers


def main(hf_dir, items_path, scores_path):
    torch.manual_seed(0)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    model.eval()
    cfg = model.config
    max_t = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
    special = "gemma" in cfg.model_type  # lm-eval-harness's add_bos_token for Gemma models
    items = [json.loads(line) for line in open(items_path) if line.strip()]
    scores = [json.loads(line) for line in open(scores_path) if line.strip()]
    assert len(items) == len(scores), f"{len(items)} items but {len(scores)} scores"
    worst, problems, correct, correct_norm = 0.0, [], 0, 0
    for i, (item, got) in enumerate(zip(items, scores)):
        ctx = tok.encode(item["ctx"], add_special_tokens=special)
        logps, counts = [], []
        for ending in item["endings"]:
            whole = tok.encode(item["ctx"] + " " + ending, add_special_tokens=special)
            split = 0  # lm-eval-harness's split: the tokens after the context's
            while split < min(len(ctx), len(whole)) and ctx[split] == whole[split]:
                split += 1
            end = whole[split:]
            ids = whole[-(max_t + 1):]
            with torch.no_grad():  # position t - 1 predicts token t
                logits = model(torch.tensor([ids[:-1]])).logits[0]
            logprobs = torch.log_softmax(logits, dim=-1)
            n = len(ids)
            lp = sum(logprobs[t - 1, ids[t]].item() for t in range(n - len(end), n))
            logps.append(lp)
            counts.append(len(end))
        label = int(item["label"])
        pred = max(range(len(logps)), key=lambda c: logps[c])
        pred_norm = max(range(len(logps)), key=lambda c: logps[c] / counts[c])
        correct += pred == label
        correct_norm += pred_norm == label
        if got["tokens"] != counts:
            problems.append(f"item {i}: token counts {got['tokens']}, transformers {counts}")
        for c, (a, b) in enumerate(zip(got["logp"], logps)):
            err = abs(a - b) / max(1.0, abs(b))
            worst = max(worst, err)
            if err > 1e-4:
                problems.append(f"item {i} ending {c}: logp {a} vs transformers {b}")

        def tied(values, k, j):
            return abs(values[k] - values[j]) <= 1e-4 * max(1.0, abs(values[j]))
        if got["pred"] != pred and not tied(logps, got["pred"], pred):
            problems.append(f"item {i}: pred {got['pred']} vs transformers {pred}")
        norms = [lp / n for lp, n in zip(logps, counts)]
        if got["pred_norm"] != pred_norm and not tied(norms, got["pred_norm"], pred_norm):
            problems.append(f"item {i}: pred_norm {got['pred_norm']} vs transformers {pred_norm}")
    print(f"{len(items)} items: worst relative logp difference {worst:.2e}; transformers acc "
          f"{correct / len(items):.4f} acc_norm {correct_norm / len(items):.4f}")
    for p in problems[:20]:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
