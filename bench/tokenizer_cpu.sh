#!/usr/bin/env bash
# lmforge vs Python tiktoken (and HF tokenizers with --hf FILE) encode throughput, same text,
# same ~4 KB documents, one run.
#   bench/tokenizer_cpu.sh [--hf tokenizer.json] TOKENIZER.tiktoken TEXT_FILE
# Default text: the KJV demo corpus. Single-thread (RAYON_NUM_THREADS=1 for the Rust side) and
# batch (all cores) figures; the ratio is single thread against single thread.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hf=()
[[ ${1:-} == --hf ]] && { hf=(--hf "$2"); shift 2; }
tok=${1:?usage: bench/tokenizer_cpu.sh [--hf tokenizer.json] TOKENIZER.tiktoken [TEXT]}
text=${2:-${LMFORGE_CACHE:-$HOME/.cache/lmforge}/demo/kjv.txt}
python=$(bash "$root/scripts/setup-python-env.sh" | tail -n 1)
ours=$("$root/build/lmforge" bench tokenizer --tokenizer "$tok" "$text")
echo "$ours"
peer=$(RAYON_NUM_THREADS=$(nproc) "$python" "$root/bench/tokenizer_peer.py" --tiktoken "$tok" "${hf[@]}" "$text")
echo "$peer"
a=$(tail -n 1 <<<"$ours" | grep -oE '[0-9.]+ MB/s' | cut -d' ' -f1)
b=$(tail -n 1 <<<"$peer" | grep -oE '[0-9.]+ MB/s' | cut -d' ' -f1)
echo "ratio lmforge / tiktoken, single thread: $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2f", a/b}')"
