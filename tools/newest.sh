#!/usr/bin/env bash
# The newest releases: run the CPU suite's fast tier (-m 'not slow') and the ahead-of-time compile
# with its launcher check for sm_90 (tests/test_aot.py) against the newest torch, triton and numpy on
# PyPI — what `pip install 'mmkernels[...]'` resolves today — instead of requirements/dev.txt's pins.
# CI's second step (.ci/run). Extra arguments go to the fast tier's pytest (e.g. -x, -q).
#
# The venv lives outside the clone, like tools/env.sh's, keyed by requirements/newest.txt, the
# Python and the versions pip resolves now (so a new release gets a fresh venv, the same releases
# reuse it). It is named newest-<key>, not venv-<key>: env.sh's cleanup (venv-*) leaves it alone,
# and this script's cleanup (newest-*) leaves env.sh's pinned venv alone.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req="$root/requirements/newest.txt"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mmkernels"
# The index as a user's pip sees it: a machine-wide pip configuration (a constraints file that
# caps torch at the releases a local mirror holds, extra indexes, local wheels) would hide the
# newest release.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_CONSTRAINT PIP_EXTRA_INDEX_URL PIP_FIND_LINKS
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# what pip resolves today for newest.txt and the package with every extra, within the package's
# declared ranges (metadata only, nothing installed)
python3 -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" -r "$req" \
  "$root[test,bench,models,patch]" >&2
python3 - "$tmp/report.json" > "$tmp/pins.txt" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print("\n".join(sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
                       if i["metadata"]["name"] != "mmkernels")))
EOF
key=$( (cat "$req"; python3 --version; cat "$tmp/pins.txt") | sha256sum | cut -c1-16)
venv="$cache/newest-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[newest] building $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r "$tmp/pins.txt" >&2   # exactly the versions keyed
  cp "$tmp/pins.txt" "$venv/pins.txt"
  touch "$venv/.complete"
  for old in "$cache"/newest-*; do    # older newest releases (each is ~6 GB); never venv-*
    [ "$old" = "$venv" ] || rm -rf "$old"
  done
fi
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2

cd "$root"
echo "[newest] $venv"
# the versions under test, printed before any test
"$venv/bin/python" -c '
import importlib.metadata as md, sys
print("[newest] python", sys.version.split()[0], " ".join(
    f"{n} {md.version(n)}" for n in ("torch", "triton", "numpy", "torchvision", "torchaudio", "transformers", "timm")))'
status=0
"$venv/bin/python" -m pytest -n auto --dist loadgroup -m 'not slow' "$@" || status=$?
# the AOT compile for sm_90 and Triton's launcher check (marked slow, so not in the fast tier)
"$venv/bin/python" -m pytest -n 0 -q tests/test_aot.py -k 'sm_90 or not sm_' || status=$?
exit $status
