"""`mdn predict` and `mdn evaluate` through the real CLI, on a 2-epoch model."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_config
from PIL import Image
from typer.testing import CliRunner

from mdn_cli.cli import app

runner = CliRunner()
KEYS = {"image", "mean", "std", "median", "mode", "interval_68", "interval_95", "components", "target_transform"}


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_data) -> Path:
    """best.pt of a 2-epoch run on the toy data."""
    tmp = tmp_path_factory.mktemp("run")
    config = write_config(tmp / "config.yaml", toy_data, tmp / "runs")
    result = mdn("train", config)
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "tiny" / "best.pt"


def test_predict_json_has_exact_keys_and_consistent_numbers(trained, toy_data):
    images = sorted((toy_data / "images").glob("*.png"))[:3]
    result = mdn("predict", *images, "--checkpoint", trained, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert set(r) == KEYS
        lo95, lo68, hi68, hi95 = r["interval_95"][0], r["interval_68"][0], r["interval_68"][1], r["interval_95"][1]
        assert lo95 < lo68 < r["median"] < hi68 < hi95
        assert r["std"] > 0
        assert sum(c["weight"] for c in r["components"]) == pytest.approx(1.0)
        assert r["mean"] == pytest.approx(sum(c["weight"] * c["mean"] for c in r["components"]), rel=1e-9)
        assert r["target_transform"] == "none"


def test_predict_table_csv_and_output_file(trained, toy_data, tmp_path):
    image = toy_data / "images" / "00000.png"
    table = mdn("predict", image, "-c", trained)
    assert table.exit_code == 0
    header = table.stdout.splitlines()[0]
    for column in ("mean", "std", "median", "mode", "68% interval", "95% interval", "components"):
        assert column in header
    out = tmp_path / "preds.csv"
    result = mdn("predict", toy_data / "images", "-c", trained, "--format", "csv", "--output", out)
    assert result.exit_code == 0 and result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 60
    assert {"interval_68_low", "interval_68_high", "interval_95_low", "interval_95_high"} <= set(rows[0])
    assert float(rows[0]["interval_95_low"]) < float(rows[0]["interval_95_high"])


def test_predict_glob_and_newest_checkpoint_by_default(trained, toy_data, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    shutil.copy(trained, run / "best.pt")
    monkeypatch.chdir(tmp_path)
    result = mdn("predict", f"{toy_data}/images/0001*.png", "--format", "json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 10
    assert "using checkpoint runs/x/best.pt" in result.stderr


def test_predict_skips_unreadable_files_and_says_so(trained, toy_data, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    good = toy_data / "images" / "00001.png"
    result = mdn("predict", good, broken, tmp_path / "missing.png", "-c", trained, "--format", "json")
    assert result.exit_code == 1
    assert [r["image"] for r in json.loads(result.stdout)] == [str(good)]
    assert "broken.jpg" in result.stderr and "missing.png" in result.stderr
    assert "2 inputs could not be read" in result.stderr and "Traceback" not in result.output


def test_predict_plot_writes_one_png_per_image(trained, toy_data, tmp_path):
    images = [toy_data / "images" / f"0000{i}.png" for i in range(2)]
    result = mdn("predict", *images, "-c", trained, "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png"]
    assert Image.open(pngs[0]).size[0] > 500


def test_predict_errors(trained, tmp_path):
    assert "--format must be one of" in mdn("predict", "x.png", "--format", "xml").output
    result = mdn("predict", tmp_path / "none.png", "-c", trained)
    assert result.exit_code == 2 and "no images to predict" in result.output
    result = mdn("predict", tmp_path / "none.png", "-c", tmp_path / "nope.pt")
    assert result.exit_code == 2


def test_evaluate_default_test_split_writes_everything(trained, tmp_path):
    out = tmp_path / "eval"
    result = mdn("evaluate", "--checkpoint", trained, "--output", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "metrics.json", "predictions.csv", "reliability.png", "pit_histogram.png", "predicted_vs_true.png"
    }
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("nll", "crps", "mae_mean", "rmse_mean", "mae_median", "rmse_median", "coverage_68", "width_68",
                "coverage_95", "width_95", "calibration_error"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert metrics["n"] == 12 and "oracle" in metrics and metrics["oracle"]["nll"] < metrics["nll"] + 5
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 12 and {"target", "mean", "std", "pit"} <= set(rows[0])
    assert all(0.0 <= float(r["pit"]) <= 1.0 for r in rows)
    for label in ("NLL", "CRPS", "95% coverage", "calibration error", "oracle"):
        assert label in result.stdout


def test_evaluate_new_labelled_csv_and_split_choice(trained, toy_data, tmp_path):
    labels = tmp_path / "new" / "labels.csv"
    labels.parent.mkdir()
    (labels.parent / "pics").mkdir()
    with open(labels, "w") as f:
        f.write("image,weight\n")
        for i in range(5):
            shutil.copy(toy_data / "images" / f"0000{i}.png", labels.parent / "pics" / f"{i}.png")
            f.write(f"pics/{i}.png,{5 + i}\n")
    result = mdn("evaluate", "-c", trained, "--data", labels, "-o", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n"] == 5
    result = mdn("evaluate", "-c", trained, "--split", "val", "-o", tmp_path / "v")
    assert result.exit_code == 0 and json.loads((tmp_path / "v" / "metrics.json").read_text())["n"] == 12
    assert mdn("evaluate", "-c", trained, "--split", "holdout").exit_code == 2

