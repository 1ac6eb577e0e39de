"""torchrun with 2 CPU processes (gloo, DistributedDataParallel) trains the same model as one process
with the same global batch, and holds decoded images and backbone features once per machine."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, write_config
from PIL import Image
from typer.testing import CliRunner

from mdn_cli.cli import app

HERE = Path(__file__).parent


def epochs(path):
    """Per-epoch (train NLLs, val NLLs) from a run's metrics.csv."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [float(r["train_nll"]) for r in rows], [float(r["val_nll"]) for r in rows]


def torchrun(*args):
    """Run torchrun with 2 CPU processes until it ends. No timeout: a process that fails makes
    torchrun stop the other and exit, and a process left waiting in a collective (a barrier, an
    all-reduce) for one that never comes is ended by gloo's own process-group timeout (30 min)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> Path:
    """200 toy images with pixel noise. The toy's flat backgrounds give many exactly equal
    activations, and whether they fall just above or below a ReLU's zero then depends on the last
    bit of a batch mean, which differs between one sum and two partial sums: the two runs would
    differ through rounding alone. Real photos have no such ties; noise removes them."""
    out = tmp_path_factory.mktemp("textured")
    load_script("make_toy_data").make_toy_dataset(out, n=200, seed=3, size=32)
    rng = np.random.default_rng(0)
    for path in sorted((out / "images").glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int16) + rng.integers(-20, 21, (32, 32, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return out


def test_torchrun_two_cpu_processes_match_a_single_process(tmp_path, textured):
    # Global batch 32: 16 per process, so BatchNorm trains (synchronised over both processes);
    # dropout on; one head-only epoch on cached features, then the whole network; the memory
    # cache shared by both processes; a few unreadable images, so that some batches split
    # unevenly. The runs differ only in float summation order.
    # fp32 steps: bf16 training steps (auto on CPUs with native bf16) round too coarsely to compare weights
    common = dict(train={"epochs": 3, "batch_size": 32, "lr": 3e-4, "early_stopping_patience": None, "unfreeze_after": 1,
                         "precision": "fp32"},
                  model={"backbone": "resnet18", "pretrained": False, "components": 2, "dropout": 0.2})
    data = {"cache": "memory", "val_fraction": 0.15, "calibration_fraction": 0.1, "test_fraction": 0.15, "on_bad_image": "skip"}
    textured = Path(shutil.copytree(textured, tmp_path / "data"))
    for i in (5, 17, 42, 77, 120):
        (textured / "images" / f"{i:05d}.png").write_bytes(b"not an image")
    single = write_config(tmp_path / "single.yaml", textured, tmp_path / "runs", run={"name": "single", "device": "cpu"}, data=data, **common)
    ddp = write_config(tmp_path / "ddp.yaml", textured, tmp_path / "runs", run={"name": "ddp", "device": "cpu"}, data=data, **common)
    assert CliRunner().invoke(app, ["train", str(single)]).exit_code == 0

    proc = torchrun("-m", "mdn_cli", "train", ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("epoch   1/3") == 1  # rank 0 alone logs
    assert "2 processes" in out

    a_train, a_val = epochs(tmp_path / "runs/single/metrics.csv")
    b_train, b_val = epochs(tmp_path / "runs/ddp/metrics.csv")
    # Rounding differences grow over the steps (AdamW moves a weight by ~lr whatever its gradient's
    # size): measured up to 7e-4 relative by the third epoch, with oneDNN's NHWC kernels.
    assert b_train == pytest.approx(a_train, rel=2e-3)
    assert b_val == pytest.approx(a_val, rel=2e-3)  # val NLL reduced over both processes' halves

    a = torch.load(tmp_path / "runs/single/last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/ddp/last.pt", weights_only=True)
    assert set(a) == set(b) and set(a["model"]) == set(b["model"])
    # Weights and BatchNorm statistics, not just their names. AdamW moves a parameter by up to ~lr
    # per step whatever the size of its gradient, so rounding differences in near-zero gradients
    # show at that scale (8 steps at lr 3e-4); BatchNorm's running statistics, moving averages of
    # batch statistics, follow those weights to a few percent of their size.
    for key, value in a["model"].items():
        if not value.is_floating_point():
            assert torch.equal(b["model"][key], value), key  # BatchNorm step counts
        elif "running_" in key:
            torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0.03 * float(value.abs().max()), msg=key)
        else:
            torch.testing.assert_close(b["model"][key], value, rtol=1e-3, atol=2e-3, msg=key)

    result = CliRunner().invoke(app, ["predict", str(textured / "images" / "00000.png"), "-c", str(tmp_path / "runs/ddp/best.pt"), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["std"] > 0


def test_decoded_images_and_backbone_features_are_held_once_per_machine(textured):
    proc = torchrun(HERE / "distributed_worker.py", textured / "images")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["cache_sees_all"] and r["cache_is_shared"]  # decoded by one process, seen by both
        assert r["features_rows_computed"] == 100 and r["features_rows"] == 200  # half computed, all held
        assert r["features_error"] < 1e-5
    assert not [p for p in Path("/dev/shm").glob("mdn-*")] if Path("/dev/shm").is_dir() else True  # nothing left behind


def test_batch_size_must_split_over_processes(tmp_path, textured):
    config = write_config(tmp_path / "c.yaml", textured, tmp_path / "runs", train={"epochs": 1, "batch_size": 9})
    proc = torchrun("-m", "mdn_cli", "train", config)
    assert proc.returncode != 0 and "train.batch_size=9 must be a multiple of the 2 processes" in proc.stderr
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
