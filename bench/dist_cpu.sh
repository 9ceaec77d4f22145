#!/usr/bin/env bash
# Data parallelism on one CPU machine: the same global batch trained by one process (all cores)
# and by N ranks (cores / N threads each) under every dist.strategy, then as one tensor-parallel
# group of N (dist.tensor_parallel), without and with sequence parallelism, in one run.
#   bench/dist_cpu.sh [--model gpt2] [--batch 4] [--seq 128] [--steps 6] [--ranks 2] [--tokenizer F]
# (default: GPT-2's tokenizer from ../shared/assets, so gpt2 is the 124M model)
# --batch is the global batch; each of N data-parallel ranks takes batch/N rows (a tensor-parallel
# group shares them; with sequence parallelism each rank holds batch/N outside attention and MLP). Prints per configuration the
# median tokens/s of the steps after the first two, peak RSS of rank 0, rank 0's optimizer
# state and parameter bytes, its traffic per step (MiB sent, as the communicator counts a ring
# algorithm's bytes) and the share of the gradient collectives' time the backward hid; then
# markdown rows for docs/benchmarks.md. Needs build/lmforge and
# OpenMPI (scripts/setup.sh installs both).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 batch=4 seq=128 steps=6 ranks=2
tokenizer=$root/../shared/assets/tokenizers/gpt2.tiktoken
source "$root/bench/options.sh"
parse_options "model batch seq steps ranks tokenizer" "$@"
cores=$(nproc)
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
common=(--set "model.preset=$model" --set "train.seq_len=$seq" --set "train.steps=$steps"
        --set train.eval_every=0 --set train.checkpoint_every=0 --set sample.prompt=
        --set train.warmup=0 --set "data.tokenizer=$tokenizer")

median_tps() {  # metrics.jsonl -> median tokens_per_s of steps > 2
  python3 - "$1" <<'PY'
import json, statistics, sys
v = [json.loads(l)["tokens_per_s"] for l in open(sys.argv[1]) if '"loss"' in l][2:]
print(f"{statistics.median(v):.1f}" if v else "n/a")
PY
}
rows=() runs=0
bench() {  # name nranks strategy [tp|sp]
  local name=$1 n=$2 strategy=$3 split=${4:-} dir="$log/run$((++runs))"
  local args=(train "${common[@]}" --set "run.dir=$dir" --set "dist.strategy=$strategy")
  local rows_per_rank=$((batch / n))
  if [[ -n $split ]]; then  # one group of n: the batch is the group's
    args+=(--set "dist.tensor_parallel=$n")
    [[ $split == sp ]] && args+=(--set dist.sequence_parallel=true)
    rows_per_rank=$batch
  fi
  if ((n == 1)); then
    args+=(--set "train.batch_size=$((batch / ranks))" --set "train.grad_accum=$ranks")
    OMP_NUM_THREADS=$cores "$root/build/lmforge" "${args[@]}" >"$log/$name.out" 2>&1 || { echo "$name failed"; tail -3 "$log/$name.out"; return; }
  else
    args+=(--set "train.batch_size=$rows_per_rank")
    OMP_NUM_THREADS=$((cores / n > 0 ? cores / n : 1)) \
      "$root/build/lmforge" launch --nproc "$n" -- "${args[@]}" >"$log/$name.out" 2>&1 || { echo "$name failed"; tail -3 "$log/$name.out"; return; }
  fi
  local tps rss opt par comm hidden
  tps=$(median_tps "$dir/metrics.jsonl")
  rss=$( (grep -oE 'peak resident memory [0-9]+' "$log/$name.out" || true) | awk '{print $4}')
  opt=$( (grep -oE 'optimizer state [0-9]+' "$log/$name.out" || true) | awk '{printf "%.0f", $3/1048576}')
  par=$( (grep -oE 'parameters [0-9]+ bytes' "$log/$name.out" || true) | awk '{printf "%.0f", $2/1048576}')
  comm=$( (grep -oE 'per step and rank [0-9.]+ MiB' "$log/$name.out" || true) | awk '{print $5}')
  hidden=$( (grep -oE '[0-9]+% hidden' "$log/$name.out" || true) | awk '{print $1}')
  echo "$name: $tps tok/s, peak RSS $rss MiB (rank 0), optimizer state ${opt:-all} MiB, parameters ${par:-all} MiB, sent ${comm:--} MiB per step, ${hidden:--} of the gradient collectives hidden"
  rows+=("| $model B=$batch T=$seq | $name | $tps | $rss | ${opt:-} | ${par:-} | ${comm:-} | ${hidden:-} |")
}

bench "1 process x $cores threads" 1 no-shard
for s in no-shard zero1 grad-shard full-shard; do
  bench "$ranks ranks $s" "$ranks" "$s"
done
bench "$ranks ranks tensor-parallel" "$ranks" no-shard tp
bench "$ranks ranks tensor- + sequence-parallel" "$ranks" no-shard sp
echo
echo "| model, global batch | configuration | tokens/s | peak RSS rank 0 (MiB) | optimizer state rank 0 (MiB) | parameters rank 0 (MiB) | sent per step, rank 0 (MiB) | gradient collectives hidden |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
