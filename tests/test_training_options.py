"""Training options: frozen backbone with the feature cache, staged unfreezing, the backbone learning
rate, the decoded-image caches, and calibration applied by predict and evaluate."""

import json
import os
import shutil

import pytest
import torch
from conftest import write_config
from typer.testing import CliRunner

from mdn_cli.data import cache as cache_module
from mdn_cli.data.cache import DecodedCache
from mdn_cli.cli import app
from mdn_cli.config import load_config
from mdn_cli.data.dataset import decode_square
from mdn_cli.engine import make_optimizer
from mdn_cli.model import MDNRegressor
from mdn_cli.train import model_args

runner = CliRunner()


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def weights(tmp_path):
    """A resnet18 state_dict file standing in for pretrained weights."""
    import torchvision

    torch.manual_seed(123)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def backbone_equal(state: dict, reference: dict) -> bool:
    return all(torch.equal(state[f"backbone.{k}"], v) for k, v in reference.items() if not k.startswith("fc."))


def test_frozen_backbone_trains_the_head_on_cached_features(tmp_path, toy_data, weights):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs",
                          model={"backbone": "resnet18", "pretrained": str(weights), "components": 2, "freeze_backbone": True})
    result = mdn("train", config)
    assert result.exit_code == 0, result.output
    assert result.output.count("computing backbone features once") == 1
    assert result.output.count("(head only)") == 2
    last = torch.load(tmp_path / "runs/tiny/last.pt", weights_only=True)["model"]
    assert backbone_equal(last, torch.load(weights, weights_only=True))  # untouched, BatchNorm statistics included


def test_unfreeze_after_trains_the_head_first_then_everything(tmp_path, toy_data, weights):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs",
                          model={"backbone": "resnet18", "pretrained": str(weights), "components": 2},
                          train={"epochs": 2, "batch_size": 8, "unfreeze_after": 1, "early_stopping_patience": None})
    result = mdn("train", config)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "train NLL" in line]
    assert "(head only)" in lines[0] and "(head only)" not in lines[1]
    last = torch.load(tmp_path / "runs/tiny/last.pt", weights_only=True)["model"]
    assert not backbone_equal(last, torch.load(weights, weights_only=True))


def test_backbone_learning_rate_scale():
    cfg = load_config(None, ["model.pretrained=false", "train.lr=0.01", "train.backbone_lr_scale=0.1", "data.image_size=32"])
    model = MDNRegressor(model_args(cfg))
    groups = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_scale).param_groups
    backbone = {id(p) for p in model.backbone.parameters()}
    for group in groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["lr"] == pytest.approx(0.001 if in_backbone.pop() else 0.01)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_decoded_cache_returns_the_decoded_image(tmp_path, toy_data, mode, monkeypatch):
    path = tmp_path / "a.png"
    shutil.copy(toy_data / "images" / "00000.png", path)
    cache = DecodedCache(mode, 1, 24, tmp_path / "cache")
    expected = decode_square(path, 24)
    assert torch.equal(cache.get(0, path, 24), expected)

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_module, "decode_square", no_decoding)
    assert torch.equal(cache.get(0, path, 24), expected)  # served from the cache


def test_disk_cache_survives_restarts_and_rebuilds_changed_files(tmp_path, toy_data, monkeypatch):
    path = tmp_path / "a.png"
    shutil.copy(toy_data / "images" / "00000.png", path)
    DecodedCache("disk", 1, 24, tmp_path / "cache").get(0, path, 24)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    calls = []
    real = cache_module.decode_square
    monkeypatch.setattr(cache_module, "decode_square", lambda *a: calls.append(a) or real(*a))
    fresh = DecodedCache("disk", 1, 24, tmp_path / "cache")  # a new process, same folder
    fresh.get(0, path, 24)
    assert calls == []
    shutil.copy(toy_data / "images" / "00001.png", path)  # the photo changes
    os.utime(path, ns=(1, 1))
    assert torch.equal(fresh.get(0, path, 24), real(path, 24))
    assert len(calls) == 1


def test_evaluate_reports_before_and_after_the_std_scale(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    assert mdn("train", config).exit_code == 0
    ckpt = torch.load(tmp_path / "runs/tiny/best.pt", weights_only=True)
    ckpt["calibration"] = {"method": "scale", "sigma_scale": 2.0}
    scaled = tmp_path / "runs/tiny/scaled.pt"
    torch.save(ckpt, scaled)
    result = mdn("evaluate", "-c", scaled, "-o", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "calibrated" in result.stdout and "uncalibrated" in result.stdout
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["width_95"] > 1.5 * metrics["uncalibrated"]["width_95"]
