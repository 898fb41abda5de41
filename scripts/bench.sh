#!/usr/bin/env bash
# The main job (README): the benchmark suite on whatever device is present.
# Results are appended to benchmarks/results/*.csv (info_nce, family, whitening, max_batch), with plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m benchmarks "$@"
