#!/usr/bin/env bash
# The test command (README, CI): installs what it needs, then runs the whole suite.
# Without a GPU, Triton kernels run in the CPU interpreter (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m pytest -q -rfEs tests "$@"
