#!/usr/bin/env bash
# lmforge vs PyTorch on the CPU: same model, batch, threads and machine, in one run.
#   bench/train_cpu.sh [--model gpt2] [--batch 4] [--seq 64] [--steps 5] [--no-compile]
#                      [--rounds 1] [--rows all]
# Runs, in order: the oneDNN matmul ceiling (lmforge bench matmul); lmforge fp32 and bf16; the
# venv's PyTorch fp32, bf16 autocast and bf16 autocast + torch.compile; Debian's PyTorch 1.13
# (python3-torch, installed when missing) fp32 and bf16 autocast. Prints each figure, achieved GFLOP/s
# (lmforge's FLOPs per token for every row), peak RSS, and a markdown row for
# docs/benchmarks.md. Needs build/lmforge and the reference venv (scripts/setup.sh --python).
# --rounds N runs the whole sequence N times, interleaved (a VM whose speed drifts for minutes
# moves every row alike), and reports each row's median over the rounds (peak RSS: the largest).
# --rows bars keeps the rows the issue's bars name: the ceiling, lmforge bf16, PyTorch 2.11's rows
# (its best configuration) and PyTorch 1.13's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 batch=4 seq=64 steps=5 compile=1 rounds=1 rows=all
source "$root/bench/options.sh"
parse_options "model batch seq steps compile rounds rows" "$@"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds: a positive integer, got $rounds" >&2; exit 2; }
[[ $rows == all || $rows == bars ]] || { echo "--rows: all or bars, got $rows" >&2; exit 2; }
threads=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=$threads
python=$(bash "$root/scripts/setup-python-env.sh" | tail -n 1)
args=(--model "$model" --batch "$batch" --seq "$seq" --steps "$steps")
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

# A row's figure in each round (one per line), and over the rounds: the median tok/s, the largest
# peak RSS.
last_match() { { grep -oE "$2" "$1" || true; } | tail -n 1 | awk "{print \$$3}"; }  # file pattern field
per_round() {  # row pattern field: last_match in each round's log
  local r
  for ((r = 1; r <= rounds; r++)); do
    [[ -s $log/$1.$r ]] && last_match "$log/$1.$r" "$2" "$3"
  done
  return 0
}
median() { sort -g | awk '{v[NR] = $1} END {if (NR) printf "%.1f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
tps() { per_round "$1" '[0-9.]+ tok/s' 1 | median; }
rss() { per_round "$1" 'peak resident [0-9]+' 3 | sort -g | tail -n 1; }
run() {  # name command...: round $round of the row, its log in $log/name.round
  local name=$1; shift
  local out="$log/$name.$round"
  if "$@" >"$out" 2>&1; then
    echo "$(tail -n 1 "$out")  (peak resident $(last_match "$out" 'peak resident [0-9]+' 3) MiB)"
  else
    echo "$name: failed (last lines below)"; tail -n 3 "$out"; : >"$out"
  fi
}
all_rows() { [[ $rows == all ]]; }

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
debian_torch=0
/usr/bin/python3 -c 'import torch' 2>/dev/null && debian_torch=1
((debian_torch)) || echo "Debian python3-torch not installed: no PyTorch 1.13 rows"
# Presets whose peer is transformers' own model (torch_train_peer.py's HF): no PyTorch 1.13 rows.
if ((debian_torch)) && [[ $model == gemma* ]]; then
  debian_torch=0
  echo "$model: the peer is transformers' model, which Debian's PyTorch 1.13 lacks: no 1.13 rows"
fi
peer=("$root/bench/torch_train_peer.py" "${args[@]}" --threads "$threads")

for ((round = 1; round <= rounds; round++)); do
  ((rounds > 1)) && echo "--- round $round of $rounds"
  run ceiling "$root/build/lmforge" bench matmul
  all_rows && run lmf32 "$root/build/lmforge" bench train "${args[@]}" --precision fp32
  run lmf16 "$root/build/lmforge" bench train "${args[@]}" --precision bf16
  # bf16 with selective activation checkpointing (norms and the MLP activation recomputed in the
  # backward, as torch.compile's min-cut rematerialization does): the memory-lean configuration.
  all_rows && run lmf16s "$root/build/lmforge" bench train "${args[@]}" --precision bf16 \
    --activation-checkpointing selective
  run t32 "$python" "${peer[@]}" --precision fp32
  run t16 "$python" "${peer[@]}" --precision bf16
  ((compile)) && run tc16 "$python" "${peer[@]}" --precision bf16 --compile
  if ((debian_torch)); then
    run d32 /usr/bin/python3 "${peer[@]}" --precision fp32
    run d16 /usr/bin/python3 "${peer[@]}" --precision bf16
  fi
done
ceiling=$(per_round ceiling 'ceiling: [0-9.]+' 2 | median)
gflop=$(per_round lmf16 '[0-9.]+ GFLOP per token' 1 | tail -n 1)
a32=$(tps lmf32) a16=$(tps lmf16)
echo
mode=$(sed -n 's/.*ceiling: .* (\(.*\))$/\1/p' "$log/ceiling.1")  # native bf16, or widened to fp32
echo "bf16 matmul ceiling (oneDNN, this machine, $mode): $ceiling GFLOP/s; $gflop GFLOP per token"
((rounds > 1)) && echo "(medians over $rounds interleaved rounds; each round's figures in brackets)"
for n in lmf32 lmf16 lmf16s t32 t16 tc16 d32 d16; do
  v=$(tps "$n")
  [[ -z $v ]] && continue
  each=""
  ((rounds > 1)) && each=" [$(per_round "$n" '[0-9.]+ tok/s' 1 | paste -sd' ')]"
  awk -v n="$n" -v v="$v" -v g="$gflop" -v c="$ceiling" -v a="$a16" -v r="$(rss "$n")" -v e="$each" \
    'BEGIN{printf "%-6s %8.1f tok/s  %6.1f GFLOP/s (%4.1f%% of bf16 ceiling)  lmforge bf16 / this: %5.2f  peak %s MiB%s\n", n, v, v*g, 100*v*g/c, a/v, r, e}'
done
echo
echo "| date | B×T | lmforge bf16 | lmforge bf16 selective (peak MiB) | lmforge fp32 | torch fp32 | torch bf16 | torch bf16+compile | torch 1.13 fp32 | torch 1.13 bf16 | bf16 GFLOP/s (% of ceiling) |"
cell() { local v; v=$(tps "$1"); echo "${v:-n/a}"; }
echo "| $(date +%F) | ${batch}×${seq} | $a16 | $(cell lmf16s) ($(rss lmf16s)) | ${a32:-n/a} | $(cell t32) | $(cell t16) | $(cell tc16) | $(cell d32) | $(cell d16) | $(awk -v v="$a16" -v g="$gflop" -v c="$ceiling" 'BEGIN{printf "%.0f (%.0f%%)", v*g, 100*v*g/c}') |"
