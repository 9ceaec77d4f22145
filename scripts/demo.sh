#!/usr/bin/env bash
# The main job on the embedded default: set up, train the default small GPT on the demo corpus
# (the King James Bible, with its own 2048-token BPE: data.tokenizer bpe:2048 in
# configs/default.yaml) on the CPU, then sample from it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
rm -rf runs/demo   # the demo's own run directory: start fresh each time
./build/lmforge train
./build/lmforge generate --checkpoint runs/demo --prompt "In the beginning" --max-tokens 300 \
  --temperature 0.8 --top-p 0.95 --seed 7
