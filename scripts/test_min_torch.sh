#!/usr/bin/env bash
# The oldest torch that pyproject admits (torch>=2.4): the tests of the ops, modules, trainer and
# build logic against torch 2.4.1 and the Triton it pins (3.0.0), in a venv of their own
# (.venv-min). CI runs this after the main suite. PyPI's torch 2.4.1 for Linux is a CUDA build
# (~5 GB with its NVIDIA libraries; it imports and runs on the CPU without a GPU). fastcl goes in
# as pure Python (FASTCL_BUILD_CUDA=0): the extension is built and tested by build_cuda.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTCL_MIN_VENV:-.venv-min}
PY=${PYTHON:-python3}
HAS_WHEELS=$("$PY" -c 'import sys; print(int((3, 8) <= sys.version_info[:2] <= (3, 12)))')
if [ "$HAS_WHEELS" != 1 ]; then
  echo "test_min_torch: SKIPPED, torch 2.4.1 has no wheels for $("$PY" -V 2>&1) (3.8 to 3.12 only)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. scripts/pip_lib.sh
"$VENV/bin/python" -c "import torch" 2>/dev/null || need_disk 7 "torch 2.4.1 (~5 GB installed)"
quiet $P "torch==2.4.1" "numpy<2" pytest "setuptools>=70" wheel
FASTCL_BUILD_CUDA=0 quiet $P --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, triton; print('oldest supported: torch', torch.__version__, 'triton', triton.__version__)"
exec "$VENV/bin/python" -m pytest -q -rfE -p no:cacheprovider --disable-warnings tests/test_info_nce.py tests/test_losses.py \
  tests/test_whitening.py tests/test_errors.py tests/test_distributed.py tests/test_distributed_family.py tests/test_distributed_whitening.py tests/test_train.py tests/test_readme.py \
  tests/test_build.py tests/test_compile.py "$@"
