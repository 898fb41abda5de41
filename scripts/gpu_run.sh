#!/usr/bin/env bash
# The ONE script for a lent GPU: builds the CUDA extension, runs the GPU test suite, then the
# benchmark sweeps, in one call. Writes env.txt, build.log, tests.log, bench.log and CSVs under
# $OUT (default ./gpu_out). Uses the machine's own python3/torch/triton/nvcc (no internet there)
# and the source checkout. Peers the image lacks (open_clip, inf-cl, lightly, PML) come as wheels
# in .whl/ (scripts/fetch_gpu_wheels.sh; pass `.whl` in the device tool's carry).
# Step timeouts add up to ~9.5 minutes, inside the device tool's 10-minute call limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

# The CUDA C++ extension, built in place for this GPU's architecture only (fast).
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
FASTCL_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH timeout 100 $PY setup.py build_ext --inplace \
  > "$OUT/build.log" 2>&1
build_rc=$?  # a failed build would only make the cuda tests skip: it fails the run instead
echo "extension build rc=$build_rc (arch $ARCH)" | tee -a "$OUT/env.txt"
$PY -c "import fastcl; print('backends:', fastcl.available_backends('cuda'))" 2>&1 | tee -a "$OUT/env.txt"

# The GPU-relevant tests: every loss, gradient and kernel variant of every backend (torch,
# triton, cuda) against float64 on the GPU (gloo, trainer, demo and the CPU emulation of the
# CUDA kernels run in CI).
timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -rs tests --ignore=tests/test_distributed.py \
  --ignore=tests/test_cuda_emulated.py \
  --ignore=tests/test_train.py --ignore=tests/test_demo.py 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
timeout 20 $PY scripts/gpu_sanity.py 2>&1 | tee -a "$OUT/tests.log"

B="$PY -m benchmarks.bench_info_nce --csv $OUT/info_nce.csv"
{
  timeout 80 $B --sizes 4096,16384,32768,65536 --dim 512 --dtype bf16
  timeout 20 $B --sizes 32768 --dim 512 --dtype bf16 --mode fwd --only naive-torch,fastcl-triton,fastcl-cuda
  timeout 60 $PY -m benchmarks.bench_max_batch --start 16384 --max-seconds 40 \
    --only naive-torch,fastcl-triton --csv "$OUT/max_batch.csv"
  timeout 25 $PY -m benchmarks.bench_whitening --csv "$OUT/whitening.csv"
  timeout 35 $PY -m benchmarks.bench_family --csv "$OUT/family.csv"
} 2>&1 | tee "$OUT/bench.log"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$build_rc"
