#!/usr/bin/env bash
# Builds the CUDA wheel of fastcl WITHOUT a GPU, and checks it (CI runs this after the tests).
#  1. A separate venv (.venv-cuda) with the CUDA build of torch (2.14.1+cu130, ~5.5 GB; its CUDA
#     library headers come with it), the peers that need torchvision (open_clip, lightly) and
#     sentence-transformers with datasets and accelerate (its MNRL and trainer; ~0.7 GB).
#  2. `pip wheel . --no-build-isolation` with FASTCL_BUILD_CUDA=1: nvcc compiles csrc/ for
#     TORCH_CUDA_ARCH_LIST (default 8.0;9.0a); a compile error fails this script.
#  3. Checks that the wheel's sm_90a code holds the wgmma kernels (cuobjdump: HGMMA in SASS).
#  4. Installs that wheel and, from outside the checkout (so the wheel is what gets imported),
#     runs the tests that need it: the extension loads, registers its ops and shape functions,
#     refuses CPU tensors with its reason; the build logic with a CUDA torch (tests/test_build.py);
#     and equality with open_clip, lightly and sentence-transformers.
# The kernels themselves are tested on a GPU by scripts/gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FASTCL_CUDA_VENV:-.venv-cuda}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
. scripts/pip_lib.sh
# torch first and pinned: nothing later may swap it for another build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || need_disk 8 "the CUDA torch (~5.5 GB installed)"
quiet $P "torch==${FASTCL_CUDA_TORCH_VERSION:-2.14.1}"
# (torch named again: a peer's requirement may not move it)
quiet $P "torch==${FASTCL_CUDA_TORCH_VERSION:-2.14.1}" ninja setuptools wheel numpy pytest "torchvision==${FASTCL_CUDA_TORCHVISION_VERSION:-0.29.1}" \
   open_clip_torch==3.3.0 lightly==1.6.0 \
   sentence-transformers==6.2.0 datasets==5.2.0 accelerate==1.15.0
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, torch.__version__; print('build torch', torch.__version__)"

[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; } || true
rm -rf dist/fastcl-*.whl build/
FASTCL_BUILD_CUDA=1 quiet "$VENV/bin/python" -m pip wheel . --no-build-isolation --no-deps -w dist -q
WHEEL=$(ls dist/fastcl-*-linux_x86_64.whl)
"$VENV/bin/python" - "$WHEEL" <<'PYEOF'
import sys, zipfile
so = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("fastcl/_C")]
print("built", sys.argv[1], "with", so)
sys.exit(0 if so else "the wheel has no fastcl/_C extension")
PYEOF
$P --no-deps --force-reinstall "$WHEEL"

cd "$(mktemp -d)"
# The Hopper path is there: sm_90a code (not plain sm_90) whose InfoNCE kernels use wgmma (HGMMA
# in SASS), read with the cuobjdump that Triton ships (the nvcc-only toolkit here has none).
SO=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('fastcl._C').origin)")
OBJDUMP=$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)
if [ -n "$OBJDUMP" ] && [[ "${TORCH_CUDA_ARCH_LIST:-9.0a}" == *9.0a* ]]; then
  "$OBJDUMP" --list-elf "$SO" | tee /tmp/fastcl_elf.txt
  grep -q "info_nce.sm_90a.cubin" /tmp/fastcl_elf.txt || { echo "no sm_90a InfoNCE code in $SO"; exit 1; }
  n=$("$OBJDUMP" -sass "$SO" | grep -c "HGMMA" || true)
  echo "wgmma (HGMMA) instructions in the sm_90a code: $n"
  [ "$n" -gt 0 ] || { echo "the sm_90a code has no HGMMA: the Hopper path is missing"; exit 1; }
fi
"$VENV/bin/python" -c "import fastcl, fastcl.cuda_backend as c; assert c.unavailable() is None, c.unavailable(); \
print('fastcl._C loads; kernels for sm', c.compiled_archs(), 'from', fastcl.__file__)"
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider --rootdir "$ROOT" \
  "$ROOT/tests/test_cuda_backend.py" "$ROOT/tests/test_errors.py" "$ROOT/tests/test_build.py" "$ROOT/tests/test_compile.py" \
  "$ROOT/tests/test_losses.py::test_equals_lightly" "$ROOT/tests/test_info_nce.py::test_clip_module_equals_open_clip" \
  "$ROOT/tests/test_losses.py::test_equals_sentence_transformers_mnrl" \
  "$ROOT/tests/test_losses.py::test_mnrl_drop_in_accepts_cosine_by_its_values" \
  "$ROOT/tests/test_losses.py::test_mnrl_drop_in_trains_like_the_original_in_sentence_transformer_trainer" \
  "$ROOT/tests/test_distributed_family.py::test_gather_distributed_equals_lightly" \
  "$ROOT/tests/test_distributed_family.py::test_gather_across_devices_equals_sentence_transformers"
