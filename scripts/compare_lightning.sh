#!/usr/bin/env bash
# Build .venv-lightning (once: torch, lightning-uq-box and this mdn), make the toy data if needed,
# then compare `mdn train` with lightning-uq-box's MDN on Lightning (scripts/compare_lightning.py):
#   bash scripts/compare_lightning.sh [--seeds 0 1 2] [--json out.json]
# About 20 minutes on 2 CPU cores for three seeds. Run nothing else meanwhile: it times both tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-lightning/bin/mdn ]; then
    "$PYTHON" -m venv .venv-lightning
    .venv-lightning/bin/pip install --quiet --upgrade pip
    .venv-lightning/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1" lightning-uq-box
    .venv-lightning/bin/pip install --quiet -e .
fi
[ -f data/toy/labels.csv ] || .venv-lightning/bin/python scripts/make_toy_data.py --out data/toy --n 2000 --seed 0
exec .venv-lightning/bin/python scripts/compare_lightning.py "$@"
