#!/usr/bin/env bash
# One prepared run for a GPU machine that has torch + triton but no internet (see README):
#   bash benchmarks/gpu_check.sh [op ...]      # from the repository root; default: every op
# Runs the GPU tests, then the quick benchmark of each op, from the source tree (PYTHONPATH=.),
# and prints the benchmarks' Markdown tables last. Up to three ops fit the device tool's 600 s per
# command with a margin, so a full check is two commands:
#   bash benchmarks/gpu_check.sh risks norm_concat attention_pool
#   bash benchmarks/gpu_check.sh concat_linear gated_sum gated_fusion
# Steps: the GPU tests with autotuning off (<= 140 s; the heuristic configurations; the sm_90 AOT,
# compile and harness tests, marked slow, run on CPU machines); every autotune configuration against
# the reference (attention_pool 30, concat_linear 30, gated_sum 60 s); then each op's quick benchmark
# under its own limit (norm_concat 75, attention_pool 140, concat_linear 140, gated_sum 75,
# gated_fusion 140 s; autotuning on), so a slow op cannot cost the others their table. A benchmark
# cut off by its limit still leaves the rows it measured (results.md is rewritten after every case
# and mode). With no op named it runs risks and all five ops, which needs more than one 600 s command.
# "risks" is a name too (in the default list, first; <= 150 s): benchmarks/gpu_risks.py answers the
# questions only a GPU can — the first call of every Triton op under CUDA-graph capture, the CUDA
# norm_concat on 4096+296 against 4096+300 and its cached backward with two blocks per SM against
# one, autotune keys met by ragged attention_pool lengths, gated_sum's tile per row count — and
# writes $OUT/risks.json.
# "model" is a name too: the end-to-end model's tests (-k models) and its training-step benchmark
# (benchmarks/train_step.py, large model, bf16 autocast, gated fusion, four providers of at most
# 100 s each; 420 s limit, so run it alone: gpu_check.sh model).
# "cuda" is a name too, run alone (gpu_check.sh cuda, <= 560 s): builds the CUDA C++ extension for
# this GPU (TORCH_CUDA_ARCH_LIST=9.0, <= 150 s), runs tests/test_cuda.py's GPU tests (every kernel
# against the reference in fp32/fp16/bf16, compute-sanitizer memcheck; <= 160 s), then the quick
# benchmark of norm_concat, attention_pool and gated_sum with the cuda and triton providers side by
# side (<= 75 s each), and writes the auto dispatch table from those results to
# $OUT/dispatch_table.json (copy it over mmkernels/cuda/dispatch_table.json and commit it, with the
# tables in benchmarks/RESULTS.md, to make auto pick the faster backend).
# Every mode first builds the CUDA extension for sm_90 only (cached; the cuda provider and tests use it).
# Logs and reports go to $OUT (the device tool's folder) or ./bench-out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=gpu
out=${OUT:-bench-out}
mkdir -p "$out"
py=${PYTHON:-python3}
ops=("$@")
[ ${#ops[@]} -gt 0 ] || ops=(risks norm_concat attention_pool concat_linear gated_sum gated_fusion)
declare -A limit=([norm_concat]=75 [attention_pool]=140 [concat_linear]=140 [gated_sum]=75 [gated_fusion]=140 [model]=420
                  [risks]=150)
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') ops: ${ops[*]}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
echo "== build the CUDA extension (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
timeout 150 "$py" -m mmkernels.cuda build 2>&1 | tail -5
build_rc=${PIPESTATUS[0]}
if [ "${ops[*]}" = cuda ]; then
  echo "== tests (GPU): tests/test_cuda.py"
  # the CPU-emulator runs of the same tests belong to CI, not to the GPU's minutes
  MMKERNELS_AUTOTUNE=0 timeout 160 "$py" -m pytest tests/test_cuda.py -q -p no:cacheprovider -m "not slow" \
    -k "not emulator and not emulated" 2>&1 \
    | tee "$out/tests-cuda.log" | tail -15
  tests_rc=${PIPESTATUS[0]}
  bench_rc=0
  for op in norm_concat attention_pool gated_sum; do
    echo "== quick benchmark: $op (cuda vs triton)"
    provs=(--provider eager --provider compile --provider triton --provider cuda)
    [ $op = attention_pool ] && provs+=(--provider sdpa --provider triton_varlen --provider cuda_varlen)
    timeout 75 "$py" -m mmkernels.bench.cli --op $op --quick "${provs[@]}" --out "$out/$op" > "$out/bench-$op.log" 2>&1
    rc=$?; tail -3 "$out/bench-$op.log"; [ $rc -eq 0 ] || bench_rc=$rc
  done
  "$py" -m mmkernels.cuda table "$out"/{norm_concat,attention_pool,gated_sum}/results.json \
    --out "$out/dispatch_table.json" || bench_rc=1
  echo "== build rc=$build_rc tests rc=$tests_rc bench rc=$bench_rc"
  for op in norm_concat attention_pool gated_sum; do cat "$out/$op/results.md" 2>/dev/null; done
  exit $(( build_rc != 0 || tests_rc != 0 || bench_rc != 0 ))
fi

echo "== tests (GPU)"
kexpr=$(IFS='|'; echo "${ops[*]}" | sed 's/|/ or /g')
MMKERNELS_AUTOTUNE=0 timeout 140 "$py" -m pytest tests -q -x -p no:cacheprovider -m "not slow and not gpu_configs" \
  -k "($kexpr or backend or nn or runtime) and not emulator and not emulated" 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}
echo "== every autotune configuration vs the reference (GPU)"
declare -A cfg_limit=([attention_pool]=30 [concat_linear]=30 [gated_sum]=60)
cfg_s=0; for op in "${ops[@]}"; do cfg_s=$((cfg_s + ${cfg_limit[$op]:-0})); done
if [ $cfg_s -gt 0 ]; then   # ops without autotuning (norm_concat, model) have no such step
  timeout $cfg_s "$py" -m pytest tests -q -p no:cacheprovider -m gpu_configs -k "$kexpr" 2>&1 | tee "$out/tests-configs.log" | tail -5
  rc=${PIPESTATUS[0]}
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || tests_rc=$rc   # 5: no test selected
fi

bench_rc=0
for op in "${ops[@]}"; do
  echo "== quick benchmark: $op"
  if [ "$op" = risks ]; then
    timeout "${limit[$op]}" "$py" benchmarks/gpu_risks.py --out "$out/risks.json" > "$out/bench-$op.log" 2>&1
    rc=$?
    cat "$out/bench-$op.log" | tail -8
    [ $rc -eq 0 ] || bench_rc=$rc
    continue
  elif [ "$op" = model ]; then
    timeout "${limit[$op]}" "$py" benchmarks/train_step.py --device cuda --fusion gated --timeout 100 \
      --out "$out/$op" > "$out/bench-$op.log" 2>&1
  else
    timeout "${limit[$op]:-150}" "$py" -m mmkernels.bench.cli --op "$op" --quick --out "$out/$op" > "$out/bench-$op.log" 2>&1
  fi
  rc=$?
  tail -3 "$out/bench-$op.log"
  [ $rc -eq 0 ] || bench_rc=$rc
done
echo "== build rc=$build_rc tests rc=$tests_rc bench rc=$bench_rc"
for op in "${ops[@]}"; do cat "$out/$op/results.md" 2>/dev/null; done
exit $(( build_rc != 0 || tests_rc != 0 || bench_rc != 0 ))
