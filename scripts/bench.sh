#!/usr/bin/env bash
# The main job (README): the benchmark suite on whatever device is present.
# Results are appended to benchmarks/results/info_nce.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m benchmarks "$@"
