#!/usr/bin/env bash
# The GPU check: bash benchmarks/gpu_check.sh [STEP|OP ...] [--budget SECONDS] [--only OP] [--tune]
# From the repository root of a checkout that carries prebuilt/ (python -m mmkernels.gpucheck prepare).
# With no arguments: the first look, within --budget (default 400 s): env, correct, headline, then
# compile, configs, tuned and risks as the budget allows; named steps (train, tests, cuda, ...) and
# ops run on their own. Every step runs in its own process under its own limit and writes its results
# to $OUT/gpu-check (or bench-out/gpu-check) as soon as they exist; the summary table comes last,
# also when the run is stopped. GPU_CHECK_DRY=1 walks every step on the CPU (the Triton interpreter,
# the CUDA emulator, tiny cases). The steps and their estimates: mmkernels/gpucheck/__init__.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
out=${OUT:+$OUT/gpu-check}
out=${out:-bench-out/gpu-check}
"$py" -m mmkernels.gpucheck --out "$out" "$@" &
pid=$!
summarised=0
on_signal() {
  kill -TERM "$pid" 2>/dev/null   # the check stops its step, writes its records, prints the summary
  wait "$pid"
  summarised=1
  exit 143
}
on_exit() {
  # the check prints the summary itself; print it here only if its process died without doing so
  if [ "$summarised" = 0 ] && [ "${rc:-1}" -ge 128 ]; then "$py" -m mmkernels.gpucheck summary "$out"; fi
}
trap on_signal TERM INT
trap on_exit EXIT
wait "$pid"
rc=$?
exit $rc
