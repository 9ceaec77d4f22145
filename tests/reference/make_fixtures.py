#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures that the `reference` tests compare lmforge against.

  make_fixtures.py --out build/ref

  ops.safetensors                 every op: inputs, dout, outputs, gradients (ops_ref.py)
  model_gpt2-tiny.safetensors     params, tokens, targets, logits, loss, grad.<param> (model_ref.py)
  model_llama3-tiny.safetensors
  adamw.safetensors               torch.optim.AdamW over three steps, and Muon (adamw_ref.py)
  preference.safetensors          DPO, ORPO and SimPO losses and gradients on gpt2-tiny (preference_ref.py)
  distill.safetensors             knowledge distillation's loss and gradients (distill_ref.py)
  distill_capped.safetensors      the same with both models' logits soft-capped
  tokenizers/                     token ids from tiktoken, HF tokenizers and sentencepiece on a
                                  ~1.5 MB corpus sample and hard cases (tokenizer_ref.py)

  make_fixtures.py --out build/ref --tokenizers-full
                                  only tokenizers-full/: the same on every document of the corpora
                                  (the `slow` tier)

Run by CTest as the `reference_fixtures` test (FIXTURES_SETUP), so fixtures are made at test
time from the reference venv and never committed.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import adamw_ref  # noqa: E402
import distill_ref  # noqa: E402
import hf_models_ref  # noqa: E402
import model_ref  # noqa: E402
import ops_ref  # noqa: E402
import preference_ref  # noqa: E402
import tokenizer_ref  # noqa: E402

# Reference tokenizer files, read-only, beside the checkout (../shared/assets/tokenizers).
TOKENIZER_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "shared", "assets", "tokenizers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the .safetensors fixtures")
    ap.add_argument("--tokenizer-assets", default=TOKENIZER_ASSETS,
                    help="the tiktoken rank files (default: ../shared/assets/tokenizers)")
    ap.add_argument("--tokenizers-full", action="store_true",
                    help="only the tokenizer fixtures of the full corpora (OUT/tokenizers-full)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.tokenizers_full:
        tokenizer_ref.make(os.path.join(args.out, "tokenizers-full"), args.tokenizer_assets,
                           full=True)
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()

    def save(name, tensors, metadata):
        path = os.path.join(args.out, name)
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)  # a reader never sees a half-written fixture
        print(f"{path}: {len(tensors)} tensors ({time.time() - t0:.1f}s)")

    tensors, cases = ops_ref.make()
    save("ops.safetensors", tensors, {"cases": json.dumps(cases), "torch": torch.__version__})

    for i, name in enumerate(model_ref.PRESETS):
        tensors, cfg = model_ref.make(name, seed=1000 + i)
        save(f"model_{name}.safetensors", tensors,
             {"config": json.dumps(cfg.to_json()), "preset": name, "torch": torch.__version__})

    tensors, hyper = adamw_ref.make()
    muon = adamw_ref.make_muon(tensors)
    save("adamw.safetensors", tensors, {"adamw": json.dumps(hyper), "muon": json.dumps(muon),
                                        "torch": torch.__version__})

    tensors, hyper = preference_ref.make()
    save("preference.safetensors", tensors, {"hyper": json.dumps(hyper), "torch": torch.__version__})
    tensors, hyper = distill_ref.make()
    save("distill.safetensors", tensors, {"hyper": json.dumps(hyper), "torch": torch.__version__})
    # both models' logits soft-capped at 0.3 (the student's reach ~0.3, the teacher's ~1)
    tensors, hyper = distill_ref.make(seed=92, logit_softcap=0.3)
    save("distill_capped.safetensors", tensors,
         {"hyper": json.dumps(hyper), "torch": torch.__version__})

    tokenizer_ref.make(os.path.join(args.out, "tokenizers"), args.tokenizer_assets)

    hf_models_ref.make(os.path.join(args.out, "hf_models"))
    print(f"hf_models: {len(hf_models_ref.CASES)} families ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
