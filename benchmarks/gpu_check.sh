#!/usr/bin/env bash
# One prepared run for a GPU machine that has torch + triton but no internet (see README):
#   bash benchmarks/gpu_check.sh            # from the repository root
# Runs the GPU tests, then the quick benchmark, from the source tree (PYTHONPATH=.), and prints the
# benchmark's Markdown table last. Meant to finish within 10 minutes on one H100/H200 (tests 230 s, benchmarks 320 s at most).
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
timeout 230 "$py" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

# one benchmark run per op, each with its own time limit, so a slow op cannot cost the others
# their table (the device tool allows 600 s per command)
bench_rc=0
for spec in norm_concat:120 attention_pool:200; do
  op=${spec%%:*} limit=${spec##*:}
  echo "== quick benchmark: $op"
  timeout "$limit" "$py" -m mmkernels.bench.cli --op "$op" --quick --out "$out/$op" > "$out/bench-$op.log" 2>&1
  rc=$?
  tail -3 "$out/bench-$op.log"
  [ $rc -eq 0 ] || bench_rc=$rc
done
echo "== tests rc=$tests_rc bench rc=$bench_rc"
for op in norm_concat attention_pool; do cat "$out/$op/results.md" 2>/dev/null; done
exit $(( tests_rc != 0 || bench_rc != 0 ))
