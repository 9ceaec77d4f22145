#!/usr/bin/env bash
# Sets up everything (packages, build, the reference Python environment) and runs the tests.
#   scripts/test.sh          every test except those labelled slow (what CI runs)
#   scripts/test.sh --slow   only the slow ones
#   scripts/test.sh --all    everything
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# CUDA code is compiled for one architecture here (H100's) to save time; GPU tests (label cuda)
# skip without a GPU.
LMFORGE_CUDA_ARCHITECTURES=${LMFORGE_CUDA_ARCHITECTURES:-90a} bash scripts/setup.sh --python
select=(-LE slow)
case ${1:-} in
  --slow) select=(-L slow) ;;
  --all) select=() ;;
esac
cd build
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ctest "${select[@]}" --output-on-failure -j1 --timeout 1500
cd "$root"
# Each tokenizer-file fuzzer briefly (libFuzzer, clang); longer: scripts/fuzz.sh 600.
[[ ${1:-} == --slow ]] || bash scripts/fuzz.sh 10
