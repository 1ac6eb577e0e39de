"""The Python API: load once, predict paths, bytes, PIL images and arrays, get the CLI's records."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mdn_cli.api import Model
from mdn_cli.cli import app
from mdn_cli.errors import CheckpointError
from mdn_cli.images import UnreadableImageError


@pytest.fixture(scope="module")
def best(tmp_path_factory, toy_data):
    from conftest import write_config

    tmp = tmp_path_factory.mktemp("api")
    config = write_config(tmp / "c.yaml", toy_data, tmp / "runs", train={"epochs": 1, "batch_size": 8})
    assert CliRunner().invoke(app, ["train", str(config)]).exit_code == 0
    return tmp / "runs" / "tiny" / "best.pt"


def test_every_kind_of_image_gives_the_records_of_mdn_predict(best, toy_data):
    path = toy_data / "images" / "00004.png"
    model = Model.load(best, device="cpu")
    pil = Image.open(path)
    inputs = [str(path), path, path.read_bytes(), pil, np.asarray(pil.convert("RGB")), np.asarray(pil.convert("RGB")).transpose(2, 0, 1)]
    records = model.predict(inputs)
    cli = json.loads(CliRunner().invoke(app, ["predict", str(path), "-c", str(best), "-f", "json", "--backend", "torch"]).stdout)[0]
    cli.pop("image")
    assert len(records) == len(inputs)
    for record in records:
        assert set(record) == set(cli)
        for key in ("mean", "std", "median", "mode"):
            assert record[key] == pytest.approx(cli[key], rel=1e-5)
        assert record["interval_68"] == pytest.approx(cli["interval_68"], rel=1e-5)
    levels = model.predict([path], levels=(0.5, 0.9))[0]
    assert "interval_50" in levels and "interval_90" in levels and "interval_68" not in levels
    described = model.describe()
    assert described["members"][0]["backbone"] == "resnet18" and described["image_size"] == 32
    assert described["calibration"]["method"] == "conformal"


def test_api_errors_are_typed(best, tmp_path):
    with pytest.raises(CheckpointError):
        Model.load(tmp_path / "missing.pt")
    model = Model.load(best, device="cpu")
    with pytest.raises(UnreadableImageError, match="upload.png"):
        model.prepare(b"not an image", name="upload.png")
    with pytest.raises(ValueError, match="uint8"):
        model.prepare(np.zeros((8, 8, 3), dtype=np.float32))
