#!/usr/bin/env bash
# lmforge prepare throughput with 1 and 2 threads beside the tokenizer's raw encode throughput
# (lmforge bench tokenizer) on the same text, in one run.
#   bench/prepare_cpu.sh TOKENIZER TEXT_FILE
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tok=${1:?usage: bench/prepare_cpu.sh TOKENIZER TEXT_FILE}
text=${2:?usage: bench/prepare_cpu.sh TOKENIZER TEXT_FILE}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Documents of ~4 KB, as JSONL, so prepare and the raw encoder see the same documents.
python3 - "$text" "$work/in.jsonl" <<'PY'
import json, sys
raw = open(sys.argv[1], encoding="utf-8", errors="replace").read()
with open(sys.argv[2], "w") as f:
    pos = 0
    while pos < len(raw):
        end = raw.find("\n", min(len(raw), pos + 4096))
        end = len(raw) if end < 0 else end + 1
        f.write(json.dumps({"text": raw[pos:end]}) + "\n")
        pos = end
PY
"$root/build/lmforge" bench tokenizer --tokenizer "$tok" "$text" | tail -n 2
# Best of 3 runs per thread count, as the raw encode figure is best of 3 passes.
for threads in 1 2; do
  best=0
  for run in 1 2 3; do
    rm -rf "$work/out"
    OMP_NUM_THREADS=$threads "$root/build/lmforge" prepare --input "$work/in.jsonl" \
      --output "$work/out" --tokenizer "$tok" --val-fraction 0.01 >/dev/null
    r=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['mb_per_s'])" "$work/out/summary.json")
    best=$(awk -v a="$best" -v b="$r" 'BEGIN{print (b > a) ? b : a}')
  done
  printf 'lmforge prepare (%s threads): %.2f MB/s\n' "$threads" "$best"
done
