#!/usr/bin/env bash
# The whole job on the embedded toy data, from nothing: virtual environment, toy data,
# training (which ends by scoring the test split into runs/toy/eval/), and predictions.
# Extra arguments go to `mdn train`, e.g.: bash scripts/quickstart.sh --set train.epochs=3
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
MDN="$PWD/.venv/bin/mdn"
"$PY" scripts/make_toy_data.py --out data/toy --n 2000 --seed 0
"$MDN" train configs/toy.yaml --overwrite "$@"
"$MDN" predict data/toy/images/00000.png data/toy/images/00001.png --checkpoint runs/toy/best.pt --plot runs/toy/plots
echo "done: metrics and plots in runs/toy/eval/, density plots in runs/toy/plots/"
