"""scripts/bench.py --quick runs end to end and reports every measurement."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Dotted paths into each setting's results that must hold a positive number.
MEASUREMENTS = (
    "train.mdn.images_per_s",
    "train.bare.images_per_s",
    "train.ratio",
    "loader.cold.images_per_s",
    "loader.cold.x_bare_step",
    "loader.memory.images_per_s",
    "loader.memory.x_bare_step",
    "loader.disk.images_per_s",
    "loader.disk.x_bare_step",
    "predict_batch.mdn.images_per_s",
    "predict_batch.bare.images_per_s",
    "predict_batch.ratio",
    "predict_batch.mdn_torch.images_per_s",
    "predict_batch.ratio_torch",
    "predict_batch.bare_decoding.images_per_s",
    "predict_batch.ratio_decoding",
    "predict_batch.ratio_torch_decoding",
    "shards.folder.images_per_s",
    "shards.local.images_per_s",
    "shards.s3.images_per_s",
    "shards.ratio_local",
    "shards.ratio_s3",
    "predict_single.mdn_s",
    "predict_single.minimal_s",
    "predict_single.ratio",
    "compute.forward_gflop_per_image",
    "compute.bare_gflops",
    "compute.mdn_gflops",
    "compute.matmul_gflops",
    "compute.bare_fraction_of_matmul",
)
WINDOW_LISTS = ("train.mdn.windows", "train.bare.windows", "loader.memory.windows", "predict_batch.mdn.windows",
                "predict_single.mdn_runs_s", "predict_single.minimal_runs_s")


def dig(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d[key]
    return d


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_quick_reports_every_measurement(tmp_path):
    out = tmp_path / "tmp.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )  # no timeout: --quick runs a fixed, small number of steps and waits on nothing but them
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["quick"] is True
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] and report["machine"]["device"]
    assert positive(report["matmul"]["gflops"])
    assert report["settings"], "no setting was measured"
    for setting in report["settings"]:
        for path in MEASUREMENTS:
            assert positive(dig(setting, path)), f"{setting['name']}: {path} = {dig(setting, path)!r}"
        for path in WINDOW_LISTS:
            values = dig(setting, path)
            assert values and all(positive(v) for v in values), f"{setting['name']}: {path} = {values!r}"
        assert len(setting["train"]["mdn"]["windows"]) == report["plan"]["train_windows"]
    assert len(report["targets"]) == 10 * len(report["settings"])  # --quick: the headline setting's ten
    for check in report["targets"]:
        assert positive(check["value"]) and isinstance(check["met"], bool)

    table = done.stdout
    assert "| setting | measurement | mdn | reference | ratio | target | met |" in table
    for setting in report["settings"]:
        rows = [line for line in table.splitlines() if line.startswith(f"| {setting['name']} ")]
        # training, 3 loader rows, 2 shard rows, batch prediction (2 backends x 2 references), single prediction, compute
        assert len(rows) == 12, table
    assert "targets met:" in table and "machine:" in table
