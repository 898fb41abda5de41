#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtualenv, with fastcl installed editable.
# torch is pinned FIRST so that pip can never resolve a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTCL_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >&2
fi
P="$VENV/bin/python -m pip install -q --disable-pip-version-check"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $P "torch==${FASTCL_TORCH_VERSION:-2.13.0}" >&2
fi
$P -e ".[triton,test,demo]" >&2
echo "$VENV/bin/python"
