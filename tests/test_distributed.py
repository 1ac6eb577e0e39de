"""torchrun with 2 CPU processes (gloo) trains the same model as one process with the same global batch."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_config
from typer.testing import CliRunner

from mdn_cli.cli import app


def epochs(path):
    """Per-epoch (train NLLs, val NLLs) from a run's metrics.csv."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [float(r["train_nll"]) for r in rows], [float(r["val_nll"]) for r in rows]


def test_torchrun_two_cpu_processes_match_a_single_process(tmp_path, toy_data):
    # Global batch 8: 4 per process. Below 16 images per process BatchNorm uses running statistics
    # in both runs and dropout is off, so the two runs compute the same maths and differ only in
    # float summation order (gradient all-reduce): a relative tolerance of 1e-4 per epoch.
    common = dict(train={"epochs": 2, "batch_size": 8, "lr": 1e-3, "early_stopping_patience": None},
                  model={"backbone": "resnet18", "pretrained": False, "components": 2, "dropout": 0.0})
    single = write_config(tmp_path / "single.yaml", toy_data, tmp_path / "runs", run={"name": "single", "device": "cpu"}, **common)
    ddp = write_config(tmp_path / "ddp.yaml", toy_data, tmp_path / "runs", run={"name": "ddp", "device": "cpu"}, **common)
    assert CliRunner().invoke(app, ["train", str(single)]).exit_code == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdn_cli", "train", str(ddp)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("epoch   1/2") == 1  # rank 0 alone logs
    assert "2 processes" in out

    a_train, a_val = epochs(tmp_path / "runs/single/metrics.csv")
    b_train, b_val = epochs(tmp_path / "runs/ddp/metrics.csv")
    assert b_train == pytest.approx(a_train, rel=1e-4)
    assert b_val == pytest.approx(a_val, rel=1e-4)  # val NLL reduced over both processes' halves

    a = torch.load(tmp_path / "runs/single/best.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/ddp/best.pt", weights_only=True)
    assert set(a) == set(b) and a["format_version"] == b["format_version"]
    assert set(a["model"]) == set(b["model"])

    result = CliRunner().invoke(app, ["predict", str(toy_data / "images" / "00000.png"), "-c", str(tmp_path / "runs/ddp/best.pt"), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["std"] > 0
