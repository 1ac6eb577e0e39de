"""`mdn predict` and `mdn evaluate` through the real CLI, on a 2-epoch model."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script, write_config
from PIL import Image
from typer.testing import CliRunner

from mdn_cli import mixture as mx
from mdn_cli.calibration.levels import central_ranks
from mdn_cli.cli import app

runner = CliRunner()
KEYS = {"image", "mean", "std", "std_aleatoric", "std_epistemic", "median", "mode", "interval_68", "interval_95", "hdr_68",
        "hdr_95", "modes", "components", "target_transform", "calibration", "ood_score", "in_distribution"}


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """best.pt of a 2-epoch run on 240 toy images, with enough calibration images (~60) for
    finite conformal 95% intervals (39 needed)."""
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "toy"
    load_script("make_toy_data").make_toy_dataset(data, n=240, seed=2, size=32)
    config = write_config(tmp / "config.yaml", data, tmp / "runs",
                          data={"calibration_fraction": 0.25, "val_fraction": 0.15, "test_fraction": 0.1})
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
        assert lo95 < lo68 < hi68 < hi95
        # the calibration says how the intervals were made, and they can be rebuilt from the components
        c = r["calibration"]
        assert c["method"] == "conformal" and c["n_images"] >= 39 and len(c["interval_probs"]) == 4 and len(c["hdr_masses"]) == 2
        assert c["calibrated_with"]["set"] in ("cell", "all calibration images")
        m = mx.Mixture(*(torch.tensor([[k[key] for k in r["components"]]], dtype=torch.float64) for key in ("weight", "mean", "std")))
        ends = torch.tensor([lo68, hi68, lo95, hi95], dtype=torch.float64)
        assert [float(mx.cdf(m, e)) for e in ends] == pytest.approx(c["interval_probs"], abs=1e-9)
        j, k = central_ranks(c["n_images"], 0.95)
        assert j >= 1 and k <= c["n_images"]
        # highest-density regions: pieces inside the support, nested by level; modes with masses summing to 1
        assert all(a < b for a, b in r["hdr_68"]) and sum(b - a for a, b in r["hdr_68"]) < sum(b - a for a, b in r["hdr_95"])
        assert sum(mode["mass"] for mode in r["modes"]) == pytest.approx(1.0, abs=1e-9)
        assert r["modes"][0]["location"] == pytest.approx(r["mode"], rel=1e-6) or len(r["modes"]) > 1
        assert r["std"] > 0
        assert sum(c["weight"] for c in r["components"]) == pytest.approx(1.0)
        assert r["mean"] == pytest.approx(sum(c["weight"] * c["mean"] for c in r["components"]), rel=1e-9)
        assert r["target_transform"] == "none"


def test_predict_table_csv_and_output_file(trained, toy_data, tmp_path):
    image = toy_data / "images" / "00000.png"
    table = mdn("predict", image, "-c", trained)
    assert table.exit_code == 0
    caption, header = table.stdout.splitlines()[:2]
    assert caption == "predicted weight:"  # the target column's name (data.target_name and data.target_unit override)
    for column in ("mean", "std", "median", "mode", "68% interval", "95% interval", "components"):
        assert column in header
    out = tmp_path / "preds.csv"
    result = mdn("predict", toy_data / "images", "-c", trained, "--format", "csv", "--output", out)
    assert result.exit_code == 0 and result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 60  # the toy_data folder
    assert {"interval_68_low", "interval_68_high", "interval_95_low", "interval_95_high"} <= set(rows[0])
    assert float(rows[0]["interval_95_low"]) < float(rows[0]["interval_95_high"])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_predictions_are_streamed_in_chunks_and_the_output_is_the_same(trained, toy_data, tmp_path, monkeypatch, backend):
    """Memory stays flat over any number of images: summaries are made a chunk at a time and
    written as they come; the output is what one pass over every image at once gives."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from mdn_cli import predict

    outputs, real = {}, predict.summarize
    for chunk in (10_000, 16):
        monkeypatch.setattr(predict, "CHUNK", chunk)
        calls = []
        monkeypatch.setattr(predict, "summarize", lambda pred, *a, **k: calls.append(len(pred.mixture)) or real(pred, *a, **k))
        for fmt in ("json", "csv", "table"):
            result = mdn("predict", toy_data / "images", "-c", trained, "--format", fmt, "--backend", backend, "--batch-size", "8",
                         "--output", tmp_path / f"{chunk}.{fmt}")
            assert result.exit_code == 0, result.output
            outputs[chunk, fmt] = (tmp_path / f"{chunk}.{fmt}").read_text()
        assert sum(calls) == 3 * 60 and (max(calls) <= 16 if chunk == 16 else calls == [60] * 3), calls
    # the same records (ood scores to rounding: the nearest-neighbour search multiplies the chunk's rows together)
    assert same(json.loads(outputs[16, "json"]), json.loads(outputs[10_000, "json"]))
    assert len(json.loads(outputs[16, "json"])) == 60
    streamed, whole = (list(csv.reader(io.StringIO(outputs[c, "csv"]))) for c in (16, 10_000))
    assert same(streamed, whole)
    assert outputs[16, "table"] == outputs[10_000, "table"]


def same(a, b) -> bool:
    """Equal, numbers (and numbers written as text) to a relative 1e-9 (float rounding)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str) and a != b:
        try:
            return same(float(a), float(b))
        except ValueError:
            return False
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-12)
    return a == b


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
    refused = mdn("predict", "x.png", "--format", "xml")
    assert refused.exit_code == 2 and all(f"'{name}'" in refused.output for name in ("xml", "table", "json", "csv"))
    result = mdn("predict", tmp_path / "none.png", "-c", trained)
    assert result.exit_code == 2 and "no images to predict" in result.output
    result = mdn("predict", tmp_path / "none.png", "-c", tmp_path / "nope.pt")
    assert result.exit_code == 2


def test_evaluate_default_test_split_writes_everything(trained, tmp_path):
    out = tmp_path / "eval"
    result = mdn("evaluate", "--checkpoint", trained, "--output", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "metrics.json", "predictions.csv", "reliability.png", "pit_histogram.png", "predicted_vs_true.png", "coverage_by_bin.png"
    }
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("nll", "crps", "mae_mean", "rmse_mean", "mae_median", "rmse_median", "coverage_68", "width_68",
                "coverage_95", "width_95", "winkler_68", "winkler_95", "calibration_error"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    n_test = sum(1 for r in csv.DictReader(open(trained.parent / "splits.csv")) if r["split"] == "test")
    assert metrics["n"] == n_test and "oracle" in metrics and metrics["oracle"]["nll"] < metrics["nll"] + 5
    assert metrics["calibration"]["method"] == "conformal" and str(n_test) in metrics["data"]
    for table in ("by_target", "by_predicted_std", "by_predicted_value"):
        bins = metrics["conditional"][table]["cells"]
        assert len(bins) == 5 and sum(b["n"] for b in bins) == n_test
        assert all({"coverage_68", "se_68", "width_95", "winkler_95"} <= set(b) for b in bins)
        assert {"cell", "coverage", "se", "n"} <= set(metrics["conditional"][table]["worst"]["95"])
        assert 0.0 <= metrics["conditional"][table]["homogeneity"]["68"]["p_value"] <= 1.0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == n_test and {"weight", "mean", "std", "pit"} <= set(rows[0])  # the target named as in the labels file
    assert all(0.0 <= float(r["pit"]) <= 1.0 for r in rows)
    # ~10 calibration images, too few for the 0.99 threshold: the warning holds at the level they support, and says so
    assert "ood_score" in rows[0] and "too few for train.ood_quantile=0.99" in metrics["unfamiliar"]["warning"]
    for label in ("NLL", "CRPS", "95% coverage", "95% interval score", "calibration error", "oracle", "coverage by predicted std",
                  "same in every cell? p ="):
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
    n_val = sum(1 for r in csv.DictReader(open(trained.parent / "splits.csv")) if r["split"] == "val")
    result = mdn("evaluate", "-c", trained, "--split", "val", "-o", tmp_path / "v")
    assert result.exit_code == 0 and json.loads((tmp_path / "v" / "metrics.json").read_text())["n"] == n_val
    assert mdn("evaluate", "-c", trained, "--split", "holdout").exit_code == 2
    # a file without a split column cannot be filtered by split: an error, not ignored
    result = mdn("evaluate", "-c", trained, "--data", labels, "--split", "test", "-o", tmp_path / "e2")
    assert result.exit_code == 2 and "split column" in result.output


def test_evaluate_never_replaces_other_results_without_being_asked(trained, toy_data, tmp_path):
    run = trained.parent
    before = (run / "eval" / "metrics.json").read_text()
    labels = tmp_path / "new" / "labels.csv"
    labels.parent.mkdir()
    shutil.copy(toy_data / "images" / "00000.png", labels.parent / "a.png")
    shutil.copy(toy_data / "images" / "00001.png", labels.parent / "b.png")
    labels.write_text("image,weight\na.png,5\nb.png,6\n")
    result = mdn("evaluate", "-c", trained, "--data", labels)  # default output: its own folder
    assert result.exit_code == 0, result.output
    assert (run / "eval" / "metrics.json").read_text() == before  # the run's test results are untouched
    assert json.loads((run / "eval-labels" / "metrics.json").read_text())["n"] == 2
    # the same evaluation again may rewrite its own results; other inputs into that folder may not
    assert mdn("evaluate", "-c", trained).exit_code == 0
    clash = mdn("evaluate", "-c", trained, "--data", labels, "-o", run / "eval")
    assert clash.exit_code == 2 and "already holds results" in clash.output and "--overwrite" in clash.output
    assert (run / "eval" / "metrics.json").read_text() == before
    assert mdn("evaluate", "-c", trained, "--data", labels, "-o", run / "eval-labels").exit_code == 0


def test_predict_levels_on_request(trained, toy_data):
    image = toy_data / "images" / "00000.png"
    result = mdn("predict", image, "-c", trained, "--format", "json", "--levels", "0.5,0.8,0.9")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert {"interval_50", "interval_80", "interval_90"} <= set(row) and "interval_95" not in row
    assert row["interval_80"][0] < row["interval_50"][0] < row["interval_50"][1] < row["interval_80"][1]
    assert row["calibration"]["levels"] == [0.5, 0.8, 0.9] and len(row["calibration"]["interval_probs"]) == 6
    for bad in ("0", "1.5", "a,b", ""):
        out = mdn("predict", image, "-c", trained, "--levels", bad)
        assert out.exit_code == 2 and "--levels" in out.output

