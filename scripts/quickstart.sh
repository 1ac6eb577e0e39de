#!/usr/bin/env bash
# The whole job on the toy data, from nothing: about 5 minutes on 2 CPU cores, most of it training.
# Virtual environment, toy data, training (which also calibrates best.pt and scores the test split
# into runs/toy/eval/), then the README's "Use" commands, as written there and in that order.
# Extra arguments go to `mdn train`, e.g.: bash scripts/quickstart.sh --set train.epochs=3
set -euo pipefail
echo "mdn quickstart: about 5 minutes on 2 CPU cores (most of it training the toy model)"
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
export PATH="$PWD/.venv/bin:$PATH"
"$PY" scripts/make_toy_data.py --out data/toy --n 2000 --seed 0
mdn check-data data/toy/labels.csv --output runs/check-toy || [ $? -eq 1 ]  # 1: something found (listed above); 2: unreadable data
mdn train configs/toy.yaml --overwrite "$@"
# --- the README's "Use" commands ---
mdn predict data/toy/images/00000.png data/toy/images/00001.png --plot runs/toy/plots
mdn predict data/toy/images --format csv --output runs/toy/predictions.csv
mdn evaluate --checkpoint runs/toy/best.pt --split val
mdn export runs/toy/best.pt --output runs/toy/toy.onnx
mdn predict data/toy/images/00000.png --checkpoint runs/toy/toy.onnx --format json
echo "done: test-split metrics and plots in runs/toy/eval/, density plots in runs/toy/plots/, the ONNX model in runs/toy/toy.onnx"
