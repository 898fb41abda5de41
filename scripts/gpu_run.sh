#!/usr/bin/env bash
# The ONE script for a lent GPU: GPU test suite, then the benchmark sweeps, in one call.
# Writes env.txt, tests.log, bench.log and CSVs under $OUT (default ./gpu_out).
# Uses the machine's own python3/torch/triton (no internet there) and the source checkout.
# Step timeouts add up to ~9.5 minutes, inside the device tool's 10-minute call limit; a fresh
# machine compiles every Triton variant, so the tests take most of it.
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

# The GPU-relevant tests: every loss, gradient and kernel variant against float64 on the GPU
# (the gloo, trainer and demo tests are CPU-only and run in CI).
timeout "${TEST_TIMEOUT:-270}" $PY -m pytest -q -rs tests --ignore=tests/test_distributed.py \
  --ignore=tests/test_train.py --ignore=tests/test_demo.py 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
timeout 30 $PY scripts/gpu_sanity.py 2>&1 | tee -a "$OUT/tests.log"

B="$PY -m benchmarks.bench_info_nce --csv $OUT/info_nce.csv"
{
  timeout 90 $B --sizes 4096,16384,32768,65536 --dim 512 --dtype bf16
  timeout 25 $B --sizes 32768 --dim 512 --dtype bf16 --mode fwd
  timeout 25 $B --sizes 32768 --dim 512 --dtype bf16 --one-direction
  timeout 60 $B --sizes 131072,262144 --dim 512 --dtype bf16 --only fastcl-triton,naive-torch --reps 5
  timeout 30 $PY -m benchmarks.bench_whitening --csv "$OUT/whitening.csv"
  timeout 40 $PY -m benchmarks.bench_family --csv "$OUT/family.csv"
} 2>&1 | tee "$OUT/bench.log"
exit "$rc"
