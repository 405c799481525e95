#!/usr/bin/env bash
# The newest releases: the package against the newest torch, triton and numpy on PyPI — what
# `pip install 'mmkernels[...]'` resolves today — instead of requirements/dev.txt's pins. CI's
# second step, after `make test` (.ci/run).
#
#   bash tools/newest.sh          the version-sensitive subset of the fast tier, then the sm_90
#                                 ahead-of-time compile with Triton's launcher check (CI)
#   bash tools/newest.sh --full   the whole fast tier (-m 'not slow'), then the ahead-of-time
#                                 compile for every target
# Other arguments go to the first pytest (e.g. -x). Workers: NEWEST_WORKERS (default auto, one a core).
#
# Why a subset in CI: the whole fast tier here takes as long as `make test` itself (~5 min on 2
# idle cores, far more on a busy machine) and mostly repeats, on new releases, code that does not
# touch them (pure-torch references, input checks, the model and report code). What a torch or
# Triton release breaks is where the package uses their internals or their compilers: the
# launcher protocol, prepared launches and the TMA descriptor cache (test_launch, test_runtime),
# call plans (test_plans: torch's dispatch-mode and autocast internals),
# the interpreter and its compat shim (mmkernels/_compat_triton.py: every op's Triton tests run
# under it), op registration, capabilities and dispatch (test_backend, test_candidates,
# test_launch_counts, test_checks), the CUDA C++ build against torch's headers (test_cuda), and
# every op's forward and backward against its float64 reference. Those run here, fp32 only
# (-k "not float16 and not bfloat16": the dtype changes no internals the fp32 cases do not reach);
# then the AOT compile of every kernel and configuration for sm_90 with the launcher check and the
# spill check (Triton's own compiler and launcher: the most release-sensitive part).
#
# The venv lives outside the clone, like tools/env.sh's, keyed by requirements/newest.txt, the
# Python and the versions pip resolves now (so a new release gets a fresh venv, the same releases
# reuse it). It is named newest-<key>, not venv-<key>: env.sh's cleanup (venv-*) leaves it alone,
# and this script's cleanup (newest-*) leaves env.sh's pinned venv alone. A cold build downloads
# about 3.3 GB of wheels (torch 0.54 GB, triton 0.29 GB, the nvidia-* CUDA libraries most of the
# rest) and installs 6.3 GB: ~6 min at 10 MB/s plus the install; resolving alone takes ~2 min.
set -euo pipefail
full=0
if [ "${1:-}" = "--full" ]; then
  full=1
  shift
fi
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
if [ "$full" = 1 ]; then
  "$venv/bin/python" -m pytest -n "${NEWEST_WORKERS:-auto}" --dist loadgroup -m 'not slow' "$@" || status=$?
  # the ahead-of-time compile for every target and Triton's launcher check (marked slow)
  "$venv/bin/python" -m pytest -n "${NEWEST_WORKERS:-auto}" --dist loadgroup -q tests/test_aot.py || status=$?
else
  "$venv/bin/python" -m pytest -n "${NEWEST_WORKERS:-auto}" --dist loadgroup -m 'not slow' \
    -k "not float16 and not bfloat16" "$@" \
    tests/test_launch.py tests/test_runtime.py tests/test_plans.py tests/test_backend.py tests/test_candidates.py \
    tests/test_launch_counts.py tests/test_checks.py tests/test_cuda.py \
    tests/test_concat_linear.py tests/test_attention_pool.py tests/test_gated_sum.py tests/test_norm_concat.py \
    tests/test_latent_pool.py tests/test_tensor_fusion.py tests/test_gated_fusion.py || status=$?
  # sm_90 and the tests that name no target (the launcher check's own test, the untuned configurations)
  "$venv/bin/python" -m pytest -n 0 -q -k "sm_90 or not sm_" tests/test_aot.py || status=$?
fi
exit $status
