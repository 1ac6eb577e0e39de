#!/usr/bin/env bash
# Rewrite constraints-dev.txt: the versions pip picks for `-e .[dev]`, keeping the pins already
# there (pass --fresh to let every package move to its newest compatible release). Run it after
# changing pyproject.toml's dependencies, then run the suite before committing the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
keep=(-c constraints-dev.txt)
[ "${1:-}" = "--fresh" ] && keep=()
report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$PY" -m pip install --quiet --dry-run --ignore-installed "${keep[@]}" -e ".[dev]" --report "$report"
"$PY" - "$report" <<'PYEOF'
import json, re, sys
header = [line for line in open("constraints-dev.txt") if line.startswith("#")]
installs = json.load(open(sys.argv[1]))["install"]
pins = sorted(
    f"{item['metadata']['name']}=={item['metadata']['version']}\n"
    for item in installs
    if item["metadata"]["name"] != "mdn-cli"
    and not re.match(r"(nvidia-|cuda-|triton)", item["metadata"]["name"], re.I)
)
open("constraints-dev.txt", "w").writelines(header + pins)
print(f"constraints-dev.txt: {len(pins)} pins")
PYEOF
