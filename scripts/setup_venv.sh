#!/usr/bin/env bash
# Create ./.venv (once) and install mdn-cli into it in editable mode with the dev extras.
# Usage: source scripts/setup_venv.sh   (sets $PY to the venv's python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "mdn-cli needs Python >= 3.11"'
    "$PYTHON" -m venv .venv
fi
PY="$PWD/.venv/bin/python"
# Reinstall only when pyproject.toml or the pins changed since the last install. The pins
# (constraints-dev.txt) keep pip from resolving against whatever PyPI published today.
stamp=.venv/.mdn-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-dev.txt -nt "$stamp" ]; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
    touch "$stamp"
fi
export PY
