#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtualenv, with fastcl installed editable.
# torch is pinned FIRST so that pip can never resolve a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTCL_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH=${FASTCL_TORCH_VERSION:-2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >&2
fi
P="$VENV/bin/python -m pip install -q --disable-pip-version-check"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ "$(uname -s)" != Linux ]; then
    $P "torch==$TORCH" >&2  # macOS: PyPI's build is the CPU (and MPS) one, with no +cpu label
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $P "torch==$TORCH" >&2  # a GPU: PyPI's default build is the CUDA one
  else
    # No GPU: the CPU build. PyPI's torch==X is a CUDA build of several GB; X+cpu is not on
    # PyPI, so it comes from a local wheel folder (PIP_FIND_LINKS) or else PyTorch's CPU index.
    $P "torch==$TORCH+cpu" >&2 2>/dev/null ||
      $P "torch==$TORCH+cpu" --index-url https://download.pytorch.org/whl/cpu \
         --extra-index-url https://pypi.org/simple >&2
  fi
fi
# Install fastcl once per version of its packaging files: later runs (tests, benchmarks) need
# no network, whereas `pip install -e .` fetches its build requirements every time.
STAMP="$VENV/.fastcl-install"
WANT="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16) $PWD"
VPY=$(cd "$VENV" && pwd)/bin/python
# (run from / so that the checkout's own fastcl/ folder cannot stand in for the installed one)
NEED="import fastcl.kernels, pytest"
[ "$(uname -s)" != Linux ] || NEED="$NEED, triton"  # Triton has Linux wheels only
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! (cd / && "$VPY" -c "$NEED") 2>/dev/null; then
  $P -e ".[triton,test,demo]" >&2
  echo "$WANT" > "$STAMP"
fi
echo "$VENV/bin/python"
