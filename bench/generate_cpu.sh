#!/usr/bin/env bash
# lmforge generate vs transformers' generate on the CPU: the same weights, prompt, greedy decoding
# (no stop token), threads and machine, in one run.
#   bench/generate_cpu.sh [--model gpt2|smollm2-135m|gemma3-270m|gemma2-2b|llama3.2-1b] [--prompt 128]
#                         [--new 128] [--batch 1] [--rounds 1]
# The model: transformers' random initialisation of the preset's shape (bench/generate_peer.py
# make), converted once with `lmforge convert`; both kept under ~/.cache/lmforge/bench-generate/.
# Rows: lmforge fp32 and bf16 (--precision), transformers fp32 and bf16 (dtype=); each prints the
# prompt's tokens/s (prefill) and the new tokens' (decode) and its peak RSS, then a markdown row
# for docs/benchmarks.md. --batch B > 1 generates B sequences of the prompt at once (lmforge
# --num-samples B --batch B, transformers a batch of B copies of it) and reports the new tokens
# of all of them per second of the whole call (prompts included). --rounds N interleaves N
# rounds and reports each figure's median (peak RSS: the largest). Needs build/lmforge and the
# reference venv (scripts/setup.sh --python).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=gpt2 prompt=128 new=128 batch=1 rounds=1
source "$root/bench/options.sh"
parse_options "model prompt new batch rounds" "$@"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds: a positive integer, got $rounds" >&2; exit 2; }
[[ $batch =~ ^[1-9][0-9]*$ ]] || { echo "--batch: a positive integer, got $batch" >&2; exit 2; }
threads=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=$threads
python=$(bash "$root/scripts/setup-python-env.sh" | tail -n 1)
lmforge=$root/build/lmforge
peer=$root/bench/generate_peer.py
work=${XDG_CACHE_HOME:-$HOME/.cache}/lmforge/bench-generate/$model
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

if [[ ! -s $work/run/config.yaml ]]; then
  echo "making the $model model (transformers' initialisation) in $work"
  rm -rf "$work" && mkdir -p "$work"
  "$python" "$peer" make --model "$model" --tiktoken "$root/../shared/assets/tokenizers" \
    --out "$work/hf"
  "$lmforge" convert --from-hf "$work/hf" --out "$work/run" >/dev/null
fi
text=$("$python" "$peer" prompt --dir "$work/hf" --prompt "$prompt"; printf x)  # (x: keeps a
text=${text%x}                                                          # final newline)

# field N of the stats line: prompt tok/s is $7, new tok/s $17 (both "(R" with the paren); a
# batch's line: "B sequences: ... in S s (R new tok/s)", R for either field
stat() {
  if ((batch > 1)); then
    grep -oE '[0-9]+ sequences: .* \([0-9.]+ new tok/s' "$1" | tail -n 1 | tr -d '(' | awk '{print $(NF - 2)}'
  else
    grep -oE 'prompt [0-9]+ tokens in [0-9.]+ s \([0-9.]+ tok/s\); [0-9]+ new tokens in [0-9.]+ s after it \([0-9.]+' "$1" | tail -n 1 | tr -d '(' | awk -v f="$2" '{print $f}'
  fi
}
rss() { grep -oE 'peak [0-9]+ KB' "$1" | tail -n 1 | awk '{printf "%d\n", $2 / 1024}'; }
median() { sort -g | awk '{v[NR] = $1} END {if (NR) printf "%.1f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
run() {  # name command...: round $round of the row, its log in $log/name.round
  local name=$1; shift
  local out="$log/$name.$round"
  if /usr/bin/time -f "peak %M KB" "$@" >"$out.out" 2>"$out"; then
    echo "$name: $(grep -E 'tok/s' "$out" | tail -n 1)  (peak resident $(rss "$out") MiB)"
  else
    echo "$name: failed (last lines below)"; tail -n 3 "$out"; : >"$out"
  fi
}
names=(lmforge_fp32 lmforge_bf16 transformers_fp32 transformers_bf16)
echo "generate on $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $threads threads: $model," \
  "prompt $prompt tokens, $new new, greedy$( ((batch > 1)) && echo ", $batch sequences at once")"
samples=(); ((batch > 1)) && samples=(--num-samples "$batch" --batch "$batch")
for ((round = 1; round <= rounds; round++)); do
  ((rounds > 1)) && echo "round $round of $rounds"
  for p in fp32 bf16; do
    run "lmforge_$p" "$lmforge" generate --checkpoint "$work/run" --prompt "$text" \
      --max-tokens "$new" --temperature 0 --ignore-eos --precision "$p" --stats "${samples[@]}"
  done
  for p in fp32 bf16; do
    run "transformers_$p" "$python" "$peer" run --dir "$work/hf" --dtype "$p" --prompt "$prompt" \
      --new "$new" --batch "$batch"
  done
done

# The markdown row: prompt tok/s / new tok/s (peak RSS MiB) per column, medians over the rounds.
cells=""
for n in "${names[@]}"; do
  # (a failed row's logs are empty: its cells read "—")
  pre=$(for ((r = 1; r <= rounds; r++)); do [[ -s $log/$n.$r ]] && stat "$log/$n.$r" 7; done | median || true)
  dec=$(for ((r = 1; r <= rounds; r++)); do [[ -s $log/$n.$r ]] && stat "$log/$n.$r" 17; done | median || true)
  mem=$(for ((r = 1; r <= rounds; r++)); do [[ -s $log/$n.$r ]] && rss "$log/$n.$r"; done | sort -g | tail -n 1 || true)
  if ((batch > 1)); then
    cells+=" **${dec:-—}** (${mem:-—}) |"
  else
    cells+=" ${pre:-—} / **${dec:-—}** (${mem:-—}) |"
  fi
done
echo "| model, prompt + new | lmforge fp32 | lmforge bf16 | transformers fp32 | transformers bf16 |"
echo "| $model, $prompt + $new$( ((batch > 1)) && echo ", $batch sequences") |$cells"
