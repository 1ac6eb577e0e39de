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


def test_one_model_shared_by_threads_gives_the_answers_of_one_thread(tmp_path, toy_data):
    """The PyTorch path keeps per-pass state (the warning's layer statistics): concurrent calls,
    from the very first, must not mix it up."""
    import threading

    from conftest import write_config

    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 1, "batch_size": 8, "ood_quantile": 0.8})
    assert CliRunner().invoke(app, ["train", str(config)]).exit_code == 0
    best = tmp_path / "runs" / "tiny" / "best.pt"
    paths = [toy_data / "images" / f"0000{i}.png" for i in range(8)]
    expected = Model.load(best, device="cpu", backend="torch").predict(paths)
    model = Model.load(best, device="cpu", backend="torch")
    results: dict[int, list] = {}
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        results[i] = [model.predict(paths[j : j + 1])[0] for j in range(len(paths))]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]
    for got in results.values():
        for a, b in zip(got, expected):
            assert a["ood_score"] == pytest.approx(b["ood_score"], rel=1e-5) and a["mean"] == pytest.approx(b["mean"], rel=1e-5)
