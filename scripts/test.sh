#!/usr/bin/env bash
# Run the test suite from nothing: creates .venv if needed, installs, runs pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
# The page's browser test (tests/test_serve.py) drives Debian's headless Chromium; install it when
# this machine allows (root and apt-get), else that one test is skipped with its reason.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver for the browser test (apt-get, quiet)..." >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 \
              chromium chromium-driver; } >/dev/null 2>&1 \
            || echo "note: could not install chromium; the browser test will be skipped" >&2
    else
        echo "note: no /usr/bin/chromium or /usr/bin/chromedriver, and apt-get needs root here; the browser test will be skipped" >&2
    fi
fi
# One test process per core (pytest-xdist), a test file at a time per process so that a file's
# trained-run fixtures are built once.
"$PY" -m pytest -q -n 2 --dist loadfile "$@"
