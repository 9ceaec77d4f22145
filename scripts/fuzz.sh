#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (build-fuzz/) and runs each for SECONDS (default 10).
# Crashing inputs are left as build-fuzz/crash-* and the script fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-10}
cmake -S "$root/fuzz" -B "$root/build-fuzz" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$root/build-fuzz" -j"$(nproc)"
cd "$root/build-fuzz"
for t in fuzz_tiktoken_file fuzz_tokenizer_json fuzz_vocab_merges fuzz_encode fuzz_safetensors; do
  echo "fuzz: $t for ${seconds}s"
  mkdir -p "corpus-$t"
  ASAN_OPTIONS=detect_leaks=0 "./$t" -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=4096 \
    -print_final_stats=1 "corpus-$t" 2>&1 | grep -E "stat::number_of_executed_units|ERROR|SUMMARY" || true
  if compgen -G "crash-*" >/dev/null || compgen -G "timeout-*" >/dev/null; then
    echo "fuzz: $t found a crash; the input is in build-fuzz/" >&2
    exit 1
  fi
done
