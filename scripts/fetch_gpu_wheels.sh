#!/usr/bin/env bash
# Downloads (here, where pip works) the peers the benchmark compares against that the GPU image
# lacks, as Python 3.12 wheels into .whl/ (git-ignored). Pass `.whl` in the device tool's carry;
# scripts/gpu_run.sh installs them into /tmp/site. The GPU image already has torch, torchvision,
# timm, sentence-transformers, pytorch-lightning (KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
for spec in open_clip_torch==3.3.0 ftfy wcwidth inf_cl==1.2.1 pytorch-metric-learning \
            lightly==1.6.0; do  # lightly.loss imports without its CLI deps (hydra)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec" 2>&1 | grep -v "is ignored" || true
done
ls .whl
