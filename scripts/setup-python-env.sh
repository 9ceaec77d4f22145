#!/usr/bin/env bash
# Creates (once) the reference Python environment used by tests and benchmarks and prints
# its python path on the last line. It lives outside the clone, keyed by the hash of
# tests/reference/requirements.txt, so fresh clones and CI reuse it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/tests/reference/requirements.txt"
hash=$(sha256sum "$req" | cut -c1-12)
cache="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
venv="$cache/venv-$hash"
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
  echo "setup-python-env: creating $venv (torch is large; this happens once)" >&2
  mkdir -p "$cache"
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp" >&2
  "$venv.tmp/bin/python" -m pip install -q --upgrade pip >&2
  "$venv.tmp/bin/python" -m pip install -q -r "$req" >&2
  rm -rf "$venv"
  mv "$venv.tmp" "$venv"
  # venv scripts embed their path; re-create the activation shims at the final location.
  python3 -m venv --upgrade "$venv" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
