#!/usr/bin/env bash
# The whole job on the embedded toy data, from nothing: virtual environment, toy data,
# training, evaluation on the test split, and a prediction for one image.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
MDN="$PWD/.venv/bin/mdn"
"$PY" scripts/make_toy_data.py --out data/toy --n 2000 --seed 0
"$MDN" train configs/toy.yaml --overwrite "$@"
