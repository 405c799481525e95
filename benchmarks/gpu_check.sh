#!/usr/bin/env bash
# One prepared run for a GPU machine that has torch + triton but no internet (see README):
#   bash benchmarks/gpu_check.sh            # from the repository root
# Runs the GPU tests, then the quick benchmark, from the source tree (PYTHONPATH=.), and prints the
# benchmark's Markdown table last. Meant to finish within 5 minutes on one H100/H200.
# Logs and reports go to $OUT (the device tool's folder) or ./bench-out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=gpu
out=${OUT:-bench-out}
mkdir -p "$out"
py=${PYTHON:-python3}
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== tests (GPU)"
timeout 200 "$py" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== quick benchmark"
timeout 240 "$py" -m mmkernels.bench.cli --quick --out "$out" > "$out/bench.log" 2>&1
bench_rc=$?
tail -5 "$out/bench.log"
echo "== tests rc=$tests_rc bench rc=$bench_rc"
cat "$out/results.md" 2>/dev/null
exit $(( tests_rc != 0 || bench_rc != 0 ))
