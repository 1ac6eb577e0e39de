"""The real `mdn train` CLI, end to end, on tiny generated images."""

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_until, write_config
from typer.testing import CliRunner

from mdn_cli.checkpoint import FORMAT_VERSION
from mdn_cli.cli import app

runner = CliRunner()


def mdn(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_folder_and_resumes(tiny_config, tmp_path):
    result = mdn("train", tiny_config)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    assert {p.name for p in run.iterdir()} == {
        ".lock", "config.yaml", "splits.csv", "metrics.csv", "curves.png", "last.pt", "best.pt", "eval"
    }
    assert {p.name for p in (run / "eval").iterdir()} == {
        "metrics.json", "predictions.csv", "reliability.png", "pit_histogram.png", "predicted_vs_true.png",
        "coverage_by_bin.png",
    }
    out = result.output
    assert "epoch   1/2" in out and "epoch   2/2" in out
    assert "val NLL" in out and "val MAE" in out and "img/s" in out and "lr " in out
    assert "best checkpoint (val nll calibrated" in out and str(run / "best.pt") in out

    # resolved config, with every default filled in
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["components"] == 2 and resolved["train"]["warmup_epochs"] == 1.0

    # a split of all 60 images into four, saved for evaluation and resume, and said
    splits = rows(run / "splits.csv")
    assert len(splits) == 60
    assert {r["split"] for r in splits} == {"train", "val", "calibration", "test"}
    counts = {s: sum(r["split"] == s for r in splits) for s in ("train", "val", "calibration", "test")}
    assert f"{counts['train']} train / {counts['val']} val / {counts['calibration']} calibration / {counts['test']} test" in out

    history = rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_nll", "val_nll", "val_nll_calibrated", "val_mae", "lr", "images_per_s", "seconds"}
    assert all(float(r["val_nll_calibrated"]) <= float(r["val_nll"]) + 1e-6 for r in history)

    # checkpoints describe themselves and load without unpickling code
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        assert ckpt["format_version"] == FORMAT_VERSION
        assert ckpt["model_args"]["backbone"] == "resnet18" and ckpt["model_args"]["components"] == 2
        assert ckpt["target_scaler"]["transform"] == "none" and ckpt["target_scaler"]["scale"] > 0
        assert ckpt["config"]["run"]["name"] == "tiny"
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and {"optimizer", "scheduler", "history", "best_val_nll"} <= set(last)

    test_metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert test_metrics["n"] == counts["test"] and "test metrics of the best checkpoint" in out
    assert "oracle" in test_metrics  # the toy data's truth.csv is found

    # a second start into the same folder refuses, naming the ways out
    again = mdn("train", tiny_config)
    assert again.exit_code == 2
    assert "already holds a run" in again.output and "--resume" in again.output and "--overwrite" in again.output

    # --resume continues from last.pt up to the new epoch count, and says so
    resumed = mdn("train", tiny_config, "--resume", "--set", "train.epochs=3")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "after epoch 2/3" in resumed.output
    assert [int(r["epoch"]) for r in rows(run / "metrics.csv")] == [1, 2, 3]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, toy_data):
    """Kill -9 a real training process mid-run; the checkpoints left are complete, and --resume
    ends in the same state as a run that was never interrupted (CPU, same seed)."""
    common = dict(train={"epochs": 3, "batch_size": 8, "lr": 1e-3, "early_stopping_patience": None})
    straight = write_config(tmp_path / "a.yaml", toy_data, tmp_path / "runs", run={"name": "straight"}, **common)
    killed = write_config(tmp_path / "b.yaml", toy_data, tmp_path / "runs", run={"name": "killed"}, **common)
    assert mdn("train", straight).exit_code == 0

    run = tmp_path / "runs" / "killed"
    returncode, _ = train_until(killed, "checkpoint-write#3", signal.SIGKILL)  # while writing epoch 2's first file
    assert returncode == -signal.SIGKILL
    assert (run / "metrics.csv").exists(), "training never finished epoch 1"
    for name in ("last.pt", "best.pt"):
        assert torch.load(run / name, weights_only=True)["epoch"] >= 1  # complete, loadable files

    result = mdn("train", killed, "--resume")
    assert result.exit_code == 0, result.output
    a = torch.load(tmp_path / "runs/straight/last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert [r["val_nll"] for r in b["history"]] == pytest.approx([r["val_nll"] for r in a["history"]], rel=1e-4)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 50, "batch_size": 8})
    run = tmp_path / "runs" / "tiny"
    returncode, err = train_until(config, "epoch-end#1")
    assert returncode == 130, err
    assert "interrupted" in err and f"mdn train {config} --resume" in err and "Traceback" not in err
    epoch = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert epoch >= 1
    result = mdn("train", config, "--resume", "--set", f"train.epochs={epoch + 1}")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output


def test_resume_refuses_a_changed_config(tiny_config):
    assert mdn("train", tiny_config).exit_code == 0
    result = mdn("train", tiny_config, "--resume", "--set", "model.components=3")
    assert result.exit_code == 2
    assert "model.components changed" in result.output


def test_overwrite_replaces_a_run(tiny_config, tmp_path):
    assert mdn("train", tiny_config, "--set", "train.epochs=1").exit_code == 0
    result = mdn("train", tiny_config, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(rows(tmp_path / "runs/tiny/metrics.csv")) == 2


def test_resume_with_a_relative_data_root(tmp_path, toy_data, monkeypatch):
    monkeypatch.chdir(toy_data.parent)
    config = write_config(tmp_path / "c.yaml", toy_data.name, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    assert mdn("train", config).exit_code == 0
    result = mdn("train", config, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output


def test_resume_without_a_run(tiny_config):
    result = mdn("train", tiny_config, "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_log_target_transform_trains(tiny_config, tmp_path):
    result = mdn("train", tiny_config, "--set", "data.target_transform=log", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "runs/tiny/best.pt", weights_only=True)
    assert ckpt["target_scaler"]["transform"] == "log"


def test_config_errors_are_one_clean_message(tiny_config):
    result = mdn("train", tiny_config, "--set", "train.lr_rate=0.1")
    assert result.exit_code == 2
    assert "did you mean train.lr?" in result.output
    assert "Traceback" not in result.output


def test_help_is_complete():
    result = mdn("--help")
    assert result.exit_code == 0 and "train" in result.output
    result = mdn("train", "--help")
    assert result.exit_code == 0
    for option in ("--set", "--resume", "--overwrite"):
        assert option in result.output


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mdn_cli.cli import app\n"
        "for args in (['--help'], ['train', '--help'], ['predict', '--help'], ['evaluate', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    # No timeout: --help only imports and prints, it waits on nothing.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
