#!/usr/bin/env bash
# Run the test suite from nothing: creates .venv if needed, installs, runs pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
"$PY" -m pytest -q "$@"
