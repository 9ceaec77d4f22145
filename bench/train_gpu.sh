#!/usr/bin/env bash
# lmforge vs PyTorch on one GPU, in one run (the device machine; lmforge from build-gpu, see
# scripts/gpu-check): the GPU's measured bf16 matmul rate (torch.matmul 8192^3), lmforge fp32
# and bf16 (fp32 and bf16 master weights; CUDA graphs; fp32 matmul outputs for comparison),
# PyTorch bf16 autocast eager and + torch.compile (SDPA, fused AdamW), same model, batch and
# random tokens. Prints tok/s, MFU (against the datasheet peak and the measured
# matmul rate) and peak GPU memory per row, lmforge bf16's op-level profile after its row.
#   bench/train_gpu.sh [--model gpt2] [--batch 16] [--seq 1024] [--steps 10] [--rows all|bars]
# --rows bars: only the bars' rows (lmforge bf16, PyTorch bf16 + torch.compile), for a short lease.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 batch=16 seq=1024 steps=10 rows=all
source "$root/bench/options.sh"
parse_options "model batch seq steps rows" "$@"
bin=${LMFORGE_BIN:-$root/build-gpu/lmforge}
python=${PYTHON:-python3}
args=(--model "$model" --batch "$batch" --seq "$seq" --steps "$steps")
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

("$python" - <<'PY' | tee "$log/ceiling"
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / 20
print(f"bf16 matmul 8192^3 on {torch.cuda.get_device_name()}: {2 * 8192**3 / dt / 1e12:.1f} TFLOP/s")
PY
) || true  # no ceiling (0) rather than no rows
ceiling=$(grep -oE '[0-9.]+ TFLOP/s' "$log/ceiling" | cut -d' ' -f1 || true)
ceiling=${ceiling:-0}
gflop=""  # FLOPs per token (lmforge's count), read off the first row that prints them: lmforge's
          # or the PyTorch peer's (the same formula), so a failed lmforge row leaves the others'
          # TFLOP/s and MFU right

row() {  # name command...
  local name=$1; shift
  if "$@" >"$log/$name" 2>&1; then
    local tps mem
    # (|| true: a row whose output lacks a figure prints 0, it does not end the script.)
    [[ -n $gflop ]] || gflop=$(grep -oE '[0-9.]+ GFLOP per token' "$log/$name" | cut -d' ' -f1 || true)
    tps=$(grep -oE '[0-9.]+ tok/s' "$log/$name" | tail -n 1 | cut -d' ' -f1 || true)
    mem=$(grep -oE 'peak GPU memory [0-9]+' "$log/$name" | tail -n 1 | awk '{print $4}' || true)
    awk -v n="$name" -v t="$tps" -v g="$gflop" -v c="$ceiling" -v m="$mem" 'BEGIN {
      tf = t * g / 1000
      printf "%-28s %10.0f tok/s  %6.1f TFLOP/s  MFU %5.1f%% (989.4)  %5.1f%% (measured %s)  peak GPU %s MiB\n",
        n, t, tf, 100 * tf / 989.4, (c > 0 ? 100 * tf / c : 0), c, m }'
  else
    echo "$name: failed (last lines below)"; tail -n 5 "$log/$name"
  fi
}
# The bars' rows first (a run cut off at its time limit still has them): lmforge bf16, PyTorch
# eager (seconds), PyTorch + torch.compile (its compilation can take a minute), then the rest.
# Three more steps with the op-level profile (not in the timing): where the time goes.
row "lmforge bf16" "$bin" bench train "${args[@]}" --precision bf16 --device cuda --profile-steps 3
echo "lmforge bf16, op by op (bench train --profile-steps 3):"
sed -n '/^profile of/,/^activations/p' "$log/lmforge bf16" | sed '$d'
echo
[[ $rows == bars ]] ||
  row "torch bf16" "$python" "$root/bench/torch_train_peer.py" "${args[@]}" --precision bf16 \
    --device cuda
row "torch bf16+compile" "$python" "$root/bench/torch_train_peer.py" "${args[@]}" --precision bf16 \
  --device cuda --compile
[[ $rows == bars ]] && exit 0
row "lmforge bf16, CUDA graphs" "$bin" bench train "${args[@]}" --precision bf16 --device cuda \
  --cuda-graphs
row "lmforge bf16, bf16 masters" "$bin" bench train "${args[@]}" --precision bf16 \
  --master-weights bf16 --device cuda
row "lmforge bf16, fp32 matmul outputs" "$bin" bench train "${args[@]}" --precision bf16 \
  --matmul-outputs fp32 --device cuda
row "lmforge fp32" "$bin" bench train "${args[@]}" --precision fp32 --device cuda
