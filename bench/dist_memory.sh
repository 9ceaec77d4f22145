#!/usr/bin/env bash
# Peak memory of the distributed set-up, resume and save paths: N ranks of a tensor-parallel
# group (fresh, --resume of a one-process checkpoint, init_from it) and N full-shard ranks (fresh,
# init_from), each training a step or two and saving its checkpoint.
#   bench/dist_memory.sh [--model gpt2] [--ranks 2] [--seq 128] [--bin build/lmforge]
#                        [--before OTHER_LMFORGE] [--tokenizer F]
# Prints per case rank 0's peak resident memory as lmforge reports it (before the final save) and
# the largest rank's over the whole run, final save included (GNU time's maximum resident set of
# the launch's children); with --before, the same cases for that binary first (e.g. a build of
# an earlier commit). Needs OpenMPI and GNU time (`time` package).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 ranks=2 seq=128 bin=$root/build/lmforge before=""
tokenizer=$root/../shared/assets/tokenizers/gpt2.tiktoken
source "$root/bench/options.sh"
parse_options "model ranks seq bin before tokenizer" "$@"
[[ -x /usr/bin/time ]] || { echo "needs GNU time: apt-get install time" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--set "model.preset=$model" --set "train.seq_len=$seq" --set train.eval_every=0
        --set sample.prompt= --set train.warmup=0 --set "data.tokenizer=$tokenizer")
OMP_NUM_THREADS=$(nproc) "$bin" train "${common[@]}" --set train.batch_size=2 --set train.steps=1 \
  --set train.checkpoint_every=1 --set "run.dir=$work/src" >"$work/src.out" 2>&1 ||
  { echo "the source checkpoint failed"; tail -3 "$work/src.out"; exit 1; }
src=$work/src/checkpoints/step-00000001
rows=()
measure() {  # label binary args...
  local label=$1 b=$2 d=$work/run$((${#rows[@]} + 1))
  shift 2
  if ! /usr/bin/time -f %M -o "$d.time" env OMP_NUM_THREADS=1 "$b" launch --nproc "$ranks" -- \
      train "${common[@]}" --set "run.dir=$d" "$@" >"$d.out" 2>&1; then
    echo "$label failed"; tail -3 "$d.out"; return
  fi
  local r0 largest
  r0=$(grep -oE 'peak resident memory [0-9]+' "$d.out" | awk '{print $4}')
  largest=$(($(tail -1 "$d.time") / 1024))
  echo "$label: rank 0 $r0 MiB before the final save, largest rank $largest MiB"
  rows+=("| $model T=$seq, $ranks ranks | $label | $r0 | $largest |")
}
tp=(--set "dist.tensor_parallel=$ranks" --set train.batch_size=4)
fs=(--set dist.strategy=full-shard --set train.batch_size=2)
for which in ${before:+before} now; do
  b=$bin
  [[ $which == before ]] && b=$before
  measure "$which: tp$ranks fresh" "$b" "${tp[@]}" --set train.steps=2
  measure "$which: tp$ranks --resume" "$b" "${tp[@]}" --set train.steps=2 "--resume=$src"
  measure "$which: tp$ranks init_from" "$b" "${tp[@]}" --set train.steps=1 "--set" "init_from=$src"
  measure "$which: full-shard fresh" "$b" "${fs[@]}" --set train.steps=1
  measure "$which: full-shard init_from" "$b" "${fs[@]}" --set train.steps=1 "--set" "init_from=$src"
done
echo
echo "| model | case | rank 0 peak MiB (before the save) | largest rank's peak MiB (whole run) |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
