#!/usr/bin/env bash
# Ensure the pinned development environment exists and print its bin/ directory.
# The venv lives outside the clone, keyed by the hash of requirements/dev.txt, so CI and
# later runs reuse it; when absent it is built from nothing (about 5 GB, a few minutes).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req="$root/requirements/dev.txt"
key=$( (cat "$req"; python3 --version) | sha256sum | cut -c1-16)
venv="${MMKERNELS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mmkernels/venv-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "[env] building $venv from $req" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r "$req" >&2
  touch "$venv/.complete"
  # drop environments built for older requirement sets (each is ~5 GB)
  for old in "$(dirname "$venv")"/venv-*; do
    [ "$old" = "$venv" ] || rm -rf "$old"
  done
fi
# The package itself is always (re)installed editable from this clone: cheap, and it points the
# console scripts (mmkernels-bench) at this tree.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
echo "$venv/bin"
