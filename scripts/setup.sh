#!/usr/bin/env bash
# Sets up everything lmforge needs on Debian 12 and builds it (Release) into build/.
#   scripts/setup.sh            system packages + build
#   scripts/setup.sh --python   also what the tests need: the reference Python environment,
#                               clang for the fuzzers, and the test corpora (dict-gcide, linux-doc)
# Packages are installed with apt-get (through sudo when not root) only when missing.
# ocl-icd-opencl-dev: Debian's dnnl-config.cmake finds OpenCL (libdnnl-dev only recommends it, and
# --no-install-recommends skips it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(build-essential cmake g++ ccache pkg-config
          libdnnl-dev ocl-icd-opencl-dev libyaml-cpp-dev libcli11-dev libfmt-dev nlohmann-json3-dev
          libpcre2-dev libsentencepiece-dev zlib1g-dev libzstd-dev libsimdjson-dev libicu-dev
          libgtest-dev googletest openmpi-bin libopenmpi-dev
          bible-kjv bible-kjv-text)
want_python=0
[[ ${1:-} == --python ]] && { want_python=1; packages+=(python3 python3-venv python3-pip clang libclang-rt-14-dev dict-gcide linux-doc zstd gzip); }

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cmake_args=(-S . -B build -DCMAKE_BUILD_TYPE=Release)
# The CUDA backend builds when nvcc is found (/usr/local/cuda); LMFORGE_CUDA_ARCHITECTURES picks
# the GPU architectures (default 80;90a; the tests build one).
[[ -n ${LMFORGE_CUDA_ARCHITECTURES:-} ]] &&
  cmake_args+=("-DLMFORGE_CUDA_ARCHITECTURES=$LMFORGE_CUDA_ARCHITECTURES")
if ((want_python)); then
  python=$(bash scripts/setup-python-env.sh | tail -n 1)
  cmake_args+=("-DLMFORGE_PYTHON=$python")
fi
cmake "${cmake_args[@]}" >/dev/null
cmake --build build -j"$(nproc)"
