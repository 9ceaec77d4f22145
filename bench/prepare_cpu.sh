#!/usr/bin/env bash
# lmforge prepare throughput with 1 and 2 threads beside the tokenizer's raw encode throughput
# (lmforge bench tokenizer, 1 thread and a 2-thread batch) on the same documents, in one run.
#   bench/prepare_cpu.sh TOKENIZER TEXT_FILE [ROUNDS]
# Shared machines drift by tens of percent within minutes, so the measurements are interleaved:
# each round runs the raw encoder, then prepare with 1 and 2 threads; the ratios are taken
# within a round and the medians over rounds are reported.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tok=${1:?usage: bench/prepare_cpu.sh TOKENIZER TEXT_FILE [ROUNDS]}
text=${2:?usage: bench/prepare_cpu.sh TOKENIZER TEXT_FILE [ROUNDS]}
rounds=${3:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Documents of ~4 KB, as JSONL, cut where `lmforge bench tokenizer` cuts the text.
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
for round in $(seq "$rounds"); do
  OMP_NUM_THREADS=2 "$root/build/lmforge" bench tokenizer --tokenizer "$tok" --repeat 1 "$text" |
    awk -v r="$round" '/batch/ {print r, "raw2", $(NF-1)} /single thread/ {print r, "raw1", $(NF-1)}'
  for threads in 1 2; do
    rm -rf "$work/out"
    OMP_NUM_THREADS=$threads "$root/build/lmforge" prepare --input "$work/in.jsonl" \
      --output "$work/out" --tokenizer "$tok" --val-fraction 0.01 >/dev/null
    python3 -c "import json,sys; print(sys.argv[2], 'prep' + sys.argv[3], json.load(open(sys.argv[1]))['mb_per_s'])" \
      "$work/out/summary.json" "$round" "$threads"
  done
done >"$work/rows"
python3 - "$work/rows" "$(basename "$tok")" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, k, v = line.split()
    rows[r][k] = float(v)
med = lambda k: statistics.median(x[k] for x in rows.values())
ratio = lambda a, b: statistics.median(x[a] / x[b] for x in rows.values())
print(f"{sys.argv[2]}, {len(rows)} rounds, medians (MB/s):")
print(f"  raw encode 1 thread {med('raw1'):.1f}, raw batch 2 threads {med('raw2'):.1f}")
print(f"  prepare 1 thread {med('prep1'):.1f} ({100 * ratio('prep1', 'raw1'):.0f}% of raw, "
      f"per-round ratios {sorted(round(100 * x['prep1'] / x['raw1']) for x in rows.values())})")
print(f"  prepare 2 threads {med('prep2'):.1f} ({100 * ratio('prep2', 'raw2'):.0f}% of the raw batch, "
      f"per-round ratios {sorted(round(100 * x['prep2'] / x['raw2']) for x in rows.values())})")
PY
