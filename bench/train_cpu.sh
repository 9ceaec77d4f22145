#!/usr/bin/env bash
# lmforge vs PyTorch, same model, batch, threads and machine, in one run.
#   bench/train_cpu.sh [--model gpt2] [--batch 4] [--seq 64] [--steps 5]
# Needs build/lmforge and the reference venv (scripts/setup.sh --python). Prints both figures
# and their ratio; copy the row into docs/benchmarks.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 batch=4 seq=64 steps=5
while (($#)); do
  case $1 in
    --model) model=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
threads=${OMP_NUM_THREADS:-$(nproc)}
python=$(bash "$root/scripts/setup-python-env.sh" | tail -n 1)
args=(--model "$model" --batch "$batch" --seq "$seq" --steps "$steps")
ours=$(OMP_NUM_THREADS=$threads "$root/build/lmforge" bench train "${args[@]}" --precision fp32 | tail -n 1)
echo "$ours"
peer=$(OMP_NUM_THREADS=$threads "$python" "$root/bench/torch_train_peer.py" "${args[@]}" --precision fp32 --threads "$threads" | tail -n 1)
echo "$peer"
peer16=$(OMP_NUM_THREADS=$threads "$python" "$root/bench/torch_train_peer.py" "${args[@]}" --precision bf16 --threads "$threads" | tail -n 1)
echo "$peer16"
a=$(grep -oE '[0-9.]+ tok/s' <<<"$ours" | cut -d' ' -f1)
b=$(grep -oE '[0-9.]+ tok/s' <<<"$peer" | cut -d' ' -f1)
c=$(grep -oE '[0-9.]+ tok/s' <<<"$peer16" | cut -d' ' -f1)
echo "ratio lmforge fp32 / torch fp32: $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2f", a/b}')"
echo "ratio lmforge fp32 / torch bf16 autocast: $(awk -v a="$a" -v c="$c" 'BEGIN{printf "%.2f", a/c}')"
