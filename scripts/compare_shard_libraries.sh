#!/usr/bin/env bash
# Build .venv-shards (once) with the three candidate shard libraries, then compare them:
#   bash scripts/compare_shard_libraries.sh LABELS.csv [--limit N] [--json out.json]
# MosaicML Streaming pins numpy below 2.2, which mdn's own environment does not: hence a venv of its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-shards/bin/python ]; then
    "$PYTHON" -m venv .venv-shards
    .venv-shards/bin/pip install --quiet --upgrade pip
    .venv-shards/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1" webdataset litdata mosaicml-streaming \
        "moto[server]" s3fs boto3 pillow
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec .venv-shards/bin/python scripts/compare_shard_libraries.py "$@"
