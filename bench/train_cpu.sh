#!/usr/bin/env bash
# lmforge vs PyTorch on the CPU: same model, batch, threads and machine, in one run.
#   bench/train_cpu.sh [--model gpt2] [--batch 4] [--seq 64] [--steps 5] [--no-compile]
# Runs, in order: the oneDNN matmul ceiling (lmforge bench matmul); lmforge fp32 and bf16; the
# venv's PyTorch fp32, bf16 autocast and bf16 autocast + torch.compile; Debian's PyTorch 1.13
# (python3-torch, installed when missing) fp32 and bf16 autocast. Prints each figure, achieved GFLOP/s
# (lmforge's FLOPs per token for every row), peak RSS, and a markdown row for
# docs/benchmarks.md. Needs build/lmforge and the reference venv (scripts/setup.sh --python).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 batch=4 seq=64 steps=5 compile=1
source "$root/bench/options.sh"
parse_options "model batch seq steps compile" "$@"
threads=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=$threads
python=$(bash "$root/scripts/setup-python-env.sh" | tail -n 1)
args=(--model "$model" --batch "$batch" --seq "$seq" --steps "$steps")
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

tps() { grep -oE '[0-9.]+ tok/s' "$1" | tail -n 1 | cut -d' ' -f1; }
rss() { grep -oE 'peak resident [0-9]+' "$1" | tail -n 1 | awk '{print $3}'; }
run() {  # name command...
  local name=$1; shift
  if "$@" >"$log/$name" 2>&1; then
    echo "$(tail -n 1 "$log/$name")  (peak resident $(rss "$log/$name") MiB)"
  else
    echo "$name: failed (last lines below)"; tail -n 3 "$log/$name"; : >"$log/$name"
  fi
}

run ceiling "$root/build/lmforge" bench matmul
ceiling=$(grep -oE 'ceiling: [0-9.]+' "$log/ceiling" | awk '{print $2}')
run lmf32 "$root/build/lmforge" bench train "${args[@]}" --precision fp32
run lmf16 "$root/build/lmforge" bench train "${args[@]}" --precision bf16
# bf16 with selective activation checkpointing (norms and the MLP activation recomputed in the
# backward, as torch.compile's min-cut rematerialization does): the memory-lean configuration.
run lmf16s "$root/build/lmforge" bench train "${args[@]}" --precision bf16 \
  --activation-checkpointing selective
gflop=$(grep -oE '[0-9.]+ GFLOP per token' "$log/lmf16" | cut -d' ' -f1)
peer=("$root/bench/torch_train_peer.py" "${args[@]}" --threads "$threads")
run t32 "$python" "${peer[@]}" --precision fp32
run t16 "$python" "${peer[@]}" --precision bf16
if ((compile)); then run tc16 "$python" "${peer[@]}" --precision bf16 --compile; else : >"$log/tc16"; fi
# The issue's bars are against Debian's PyTorch: installed here when missing (apt, as setup.sh).
# Its fp32 GEMMs go to whatever libblas.so.3 the alternatives system names: with only libblas3
# (the netlib reference BLAS, one thread) it trains GPT-2 at ~5 tok/s, so OpenBLAS comes with it.
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null ||
  ! dpkg-query -W -f='${Status}' libopenblas0-pthread 2>/dev/null | grep -q "install ok installed"; then
  echo "installing Debian's python3-torch (the PyTorch 1.13 peer) and OpenBLAS"
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-torch \
    libopenblas0-pthread >/dev/null 2>&1 || echo "could not install python3-torch"
fi
if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  run d32 /usr/bin/python3 "${peer[@]}" --precision fp32
  run d16 /usr/bin/python3 "${peer[@]}" --precision bf16
else
  echo "Debian python3-torch not installed: no PyTorch 1.13 rows"; : >"$log/d32"; : >"$log/d16"
fi

a32=$(tps "$log/lmf32") a16=$(tps "$log/lmf16")
echo
mode=$(sed -n 's/.*ceiling: .* (\(.*\))$/\1/p' "$log/ceiling")  # native bf16, or widened to fp32
echo "bf16 matmul ceiling (oneDNN, this machine, $mode): $ceiling GFLOP/s; $gflop GFLOP per token"
for n in lmf32 lmf16 lmf16s t32 t16 tc16 d32 d16; do
  v=$(tps "$log/$n" || true)
  [[ -z $v ]] && continue
  awk -v n="$n" -v v="$v" -v g="$gflop" -v c="$ceiling" -v a="$a16" -v r="$(rss "$log/$n")" \
    'BEGIN{printf "%-6s %8.1f tok/s  %6.1f GFLOP/s (%4.1f%% of bf16 ceiling)  lmforge bf16 / this: %5.2f  peak %s MiB\n", n, v, v*g, 100*v*g/c, a/v, r}'
done
echo
echo "| date | B×T | lmforge bf16 | lmforge bf16 selective (peak MiB) | lmforge fp32 | torch fp32 | torch bf16 | torch bf16+compile | torch 1.13 fp32 | torch 1.13 bf16 | bf16 GFLOP/s (% of ceiling) |"
cell() { local v; v=$(tps "$log/$1" || true); echo "${v:-n/a}"; }
echo "| $(date +%F) | ${batch}×${seq} | $a16 | $(cell lmf16s) ($(rss "$log/lmf16s")) | $a32 | $(cell t32) | $(cell t16) | $(cell tc16) | $(cell d32) | $(cell d16) | $(awk -v v="$a16" -v g="$gflop" -v c="$ceiling" 'BEGIN{printf "%.0f (%.0f%%)", v*g, 100*v*g/c}') |"
