#!/usr/bin/env bash
# The ONE script for a lent GPU: GPU test suite, then the benchmark sweep, in one call.
# Writes env.txt, tests.log, bench.log and info_nce.csv under $OUT (default ./gpu_out).
# Uses the machine's own python3/torch/triton (no internet there) and the source checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
$PY scripts/gpu_sanity.py 2>&1 | tee -a "$OUT/tests.log"
timeout 300 $PY scripts/gpu_quick_check.py 2>&1 | tee -a "$OUT/tests.log" || rc=1

B="timeout ${BENCH_TIMEOUT:-150} $PY -m benchmarks.bench_info_nce --csv $OUT/info_nce.csv"
{
  $B --sizes 4096,16384,32768,65536 --dim 512 --dtype bf16
  $B --sizes 32768 --dim 512 --dtype bf16 --mode fwd
  $B --sizes 32768 --dim 512 --dtype bf16 --one-direction
  $B --sizes 131072,262144 --dim 512 --dtype bf16 --only fastcl-triton,naive-torch --reps 5
  timeout 120 $PY -m benchmarks.bench_whitening --csv "$OUT/whitening.csv"
  timeout 150 $PY -m benchmarks.bench_family --csv "$OUT/family.csv"
} 2>&1 | tee "$OUT/bench.log"
exit "$rc"
