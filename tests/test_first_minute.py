"""The first minute: `mdn train labels.csv` (no YAML: a plan, with an estimated time), `mdn init`,
the whole run's ETA while training, and `mdn check-data` on planted problems."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_config
from PIL import Image
from typer.testing import CliRunner

from mdn_cli.cli import app
from mdn_cli.config import load_config
from mdn_cli.config.planner import Machine, plan
from mdn_cli.errors import ConfigError
from mdn_cli.eta import RunEstimate, duration

runner = CliRunner()
CPU = Machine("cpu", 2, 8 << 30)


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


def labelled(tmp_path: Path, toy_data: Path, rows: int = 60, extra: dict | None = None, target: str = "weight") -> Path:
    """A copy of the toy data's first `rows` images and labels, with optional extra columns."""
    source = list(csv.DictReader(open(toy_data / "labels.csv")))[:rows]
    path = tmp_path / "data" / "labels.csv"
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    for r in source:
        shutil.copy(toy_data / r["image"], path.parent / r["image"])
    columns = ["image", target, *(extra or {})]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, r in enumerate(source):
            writer.writerow([r["image"], r["weight"], *(values[i] for values in (extra or {}).values())])
    return path


# --- the planner ---------------------------------------------------------------------------------


def test_the_planner_finds_the_columns_and_chooses_for_the_data_and_the_machine(tmp_path, toy_data):
    labels = labelled(tmp_path, toy_data)
    p = plan(labels, CPU)
    cfg = p.config
    assert (cfg.data.image_column, cfg.data.target_column) == ("image", "weight")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.model.pretrained is True  # weights that come with pip
    assert cfg.data.image_size == 32  # the toy images are 32 px: never upscaled
    assert cfg.data.target_transform == "none" and "no need for a log" in p.reasons["data.target_transform"]
    assert cfg.train.epochs == 30 and cfg.train.unfreeze_after == 1 and cfg.data.cache == "memory"
    assert Path(cfg.data.root) == labels.parent and cfg.run.name == "data"
    gpu = plan(labels, Machine("cuda", 8, 64 << 30)).config
    assert gpu.train.batch_size == 64 and gpu.data.image_size == 32
    tight = plan(labels, Machine("cpu", 2, 1000)).config  # no memory to keep decoded images
    assert tight.data.cache == "none"


def test_positive_targets_spanning_an_order_of_magnitude_are_modelled_on_the_log(tmp_path, toy_data):
    labels = labelled(tmp_path, toy_data)
    rows = list(csv.reader(open(labels)))
    for i, row in enumerate(rows[1:]):
        row[1] = str(1 + i * 2)  # 1 .. 119: ages, say
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    p = plan(labels, CPU)
    assert p.config.data.target_transform == "log" and "from 1 to 119" in p.reasons["data.target_transform"]


def test_several_candidate_columns_stop_with_the_choice_to_make(tmp_path, toy_data):
    labels = labelled(tmp_path, toy_data, extra={"age_days": [str(i) for i in range(60)]})
    with pytest.raises(ConfigError, match=r"2 columns could be the target \(weight, age_days\); choose one with --set data.target_column="):
        plan(labels, CPU)
    assert plan(labels, CPU, ["data.target_column=age_days"]).config.data.target_column == "age_days"
    result = mdn("train", labels)
    assert result.exit_code == 2 and "--set data.target_column=weight" in result.output and "Traceback" not in result.output


def test_overrides_apply_on_top_of_the_plan_and_are_said_so(tmp_path, toy_data):
    p = plan(labelled(tmp_path, toy_data), CPU, ["train.epochs=3", "model.components=2"])
    assert p.config.train.epochs == 3 and p.config.model.components == 2
    assert p.reasons["train.epochs"] == "--set on the command line"


# --- mdn init and mdn train labels.csv -----------------------------------------------------------


def test_init_writes_the_commented_yaml_train_would_use(tmp_path, toy_data):
    labels = labelled(tmp_path, toy_data)
    out = tmp_path / "config.yaml"
    result = mdn("init", labels, "-o", out)
    assert result.exit_code == 0, result.output
    assert "plan for" in result.output and f"wrote {out}" in result.output
    text = out.read_text()
    assert text.startswith("# Planned by `mdn init") and "# chosen: the numeric column" in text
    assert load_config(out) == plan(labels, Machine.here()).config  # reads back as the very plan
    assert mdn("init", labels, "-o", out).exit_code == 2  # never over a file without --overwrite


def test_train_from_a_labels_csv_prints_its_plan_and_eta_and_its_yaml_repeats_the_run(tmp_path, toy_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = labelled(tmp_path, toy_data)
    small = ["--set", "train.epochs=2", "--set", "data.num_workers=0", "--set", "train.batch_size=8"]
    result = mdn("train", labels, *small)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "plan for" in out and "  schedule  2 epochs of batches of 8" in out
    assert "estimated time for the whole run:" in out and "30 train /" not in out.split("plan for")[0]
    assert "(run: ~" in out  # the whole run's time left, in every epoch's line
    run = tmp_path / "runs" / "data"
    written = run / "config.yaml"
    assert "# chosen:" in written.read_text()
    again = mdn("train", written, "--set", "run.name=again")
    assert again.exit_code == 0, again.output
    a = torch.load(run / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "again" / "best.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run, bit for bit


def test_the_run_estimate_is_corrected_by_the_epochs_that_finished():
    e = RunEstimate(epochs=10, head_epochs=1, full_epoch_s=60.0, head_epoch_s=2.0, features_s=30.0, after_s=20.0)
    assert e.total() == pytest.approx(30 + 2 + 9 * 60 + 20)
    e.finished_epoch(True, 40.0)  # the head-only epoch took its features' time too
    assert e.remaining(1) == pytest.approx(9 * 60 + 20)
    e.finished_epoch(False, 90.0)
    e.finished_epoch(False, 110.0)  # slower than the probe: the estimate follows
    assert e.remaining(3) == pytest.approx(7 * 100 + 20)
    assert [duration(s) for s in (5, 89, 600, 3900)] == ["5 s", "89 s", "10 min", "1 h 05 min"]


# --- mdn check-data ------------------------------------------------------------------------------


def planted(tmp_path: Path, toy_data: Path) -> tuple[Path, dict[str, str]]:
    """A copy of 40 toy images with problems planted; returns the labels file and {what: image}."""
    root = tmp_path / "planted"
    (root / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(toy_data / "labels.csv")))[:40]
    for r in rows:
        shutil.copy(toy_data / r["image"], root / r["image"])
    big = Image.open(toy_data / rows[1]["image"]).convert("RGB").resize((96, 96), Image.BICUBIC)
    big.save(root / "images" / "big.png")  # a near copy of row 1: the same photo at another size...
    Image.open(toy_data / rows[2]["image"]).convert("RGB").save(root / "images" / "recompressed.jpg", quality=70)  # ...and re-encoded
    shutil.copy(toy_data / rows[0]["image"], root / "images" / "copy.png")  # an exact copy of row 0
    (root / "images" / "truncated.png").write_bytes((toy_data / rows[3]["image"]).read_bytes()[:200])
    (root / "images" / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8), (200, 100, 50)).save(root / "images" / "tiny.png")
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(root / "images" / "cmyk.jpg")
    planted = {"exact": "images/copy.png", "resized": "images/big.png", "recompressed": "images/recompressed.jpg",
               "truncated": "images/truncated.png", "not an image": "images/text.png", "tiny": "images/tiny.png",
               "cmyk": "images/cmyk.jpg"}
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "weight", "split"])
        for i, r in enumerate(rows):
            writer.writerow([r["image"], r["weight"], "train" if i < 30 else "test"])
        writer.writerow(["images/copy.png", rows[0]["weight"], "test"])  # the copy sits in test: a leak
        writer.writerow(["images/big.png", rows[1]["weight"], "train"])
        writer.writerow(["images/recompressed.jpg", rows[2]["weight"], "train"])
        for name in ("truncated", "not an image", "tiny", "cmyk"):
            writer.writerow([planted[name], "10.0", "train"])
        writer.writerow(["images/00005.png", "heavy", "train"])  # not a number
        writer.writerow(["images/missing.png", "9.0", "train"])
        writer.writerow(["images/outlier.png", "900.0", "train"])
    Image.effect_noise((32, 32), 40).convert("RGB").save(root / "images" / "outlier.png")  # its own photo, an absurd label
    return root / "labels.csv", planted


def test_check_data_names_every_planted_problem(tmp_path, toy_data):
    labels, planted_names = planted(tmp_path, toy_data)
    out = tmp_path / "check"
    result = mdn("check-data", labels, "--output", out)
    assert result.exit_code == 1, result.output
    text = result.output
    report = json.loads((out / "report.json").read_text())
    pairs = list(csv.DictReader(open(out / "duplicates.csv")))
    exact = [p for p in pairs if p["kind"] == "exact"]
    assert [(p["image_a"], p["split_a"], p["image_b"], p["split_b"]) for p in exact] == [
        ("images/00000.png", "train", "images/copy.png", "test")]
    assert "exact: images/00000.png (train) = images/copy.png (test)" in text  # the leak, named with both splits
    near = {frozenset((p["image_a"], p["image_b"])) for p in pairs if p["kind"] == "near"}
    assert frozenset(("images/00001.png", "images/big.png")) in near
    assert frozenset(("images/00002.png", "images/recompressed.jpg")) in near
    assert report["test_images_with_a_copy_in_train"] == 1
    for name in ("truncated", "not an image", "tiny"):
        assert planted_names[name] in text, name
    assert "CMYK" in text and "images/missing.png" in text and "'heavy'" in text
    assert "images/outlier.png: 900 is" in text
    assert (out / "label_histogram.png").stat().st_size > 5000


def test_check_data_on_clean_data_reports_nothing(tmp_path, toy_data):
    root = tmp_path / "clean"
    (root / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(toy_data / "labels.csv")))[:40]
    for r in rows:
        shutil.copy(toy_data / r["image"], root / r["image"])
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "weight"])
        writer.writerows([r["image"], r["weight"]] for r in rows)
    result = mdn("check-data", root / "labels.csv", "--output", tmp_path / "check")
    assert result.exit_code == 0, result.output
    assert "summary: 0 exact and 0 near-duplicate pairs (0 across splits; 0 test images with a copy in train), 0 label problems, " \
           "0 image problems, 0 outliers" in result.output


def lookalike_photos(folder: Path) -> None:
    """Two photos with the same broad layout and different detail (as aligned faces of two
    people are), which a 64-bit perceptual hash cannot tell apart, and a re-sized, re-compressed
    copy of the first."""
    import numpy as np

    side = 256
    y, x = np.mgrid[0:side, 0:side] / side
    layout = np.asarray(Image.fromarray(np.random.default_rng(3).uniform(0, 255, (4, 4, 3)).astype(np.uint8))
                        .resize((side, side), Image.BICUBIC), dtype=np.float32)

    def photo(seed: int) -> Image.Image:
        rng, detail = np.random.default_rng(seed), np.zeros((side, side))
        for _ in range(6):  # 5-7 cycles across: finer than the 64-bit hash sees, coarser than the 256-bit one
            fx, fy = rng.integers(5, 8, 2) * rng.choice([-1, 1], 2)
            detail += np.cos(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
        return Image.fromarray(np.clip(layout + 5 * detail[..., None], 0, 255).astype(np.uint8))

    photo(103).save(folder / "one.png")
    photo(203).save(folder / "other.png")
    photo(103).resize((180, 180)).save(folder / "one-again.jpg", quality=70)


def test_check_data_tells_lookalikes_from_copies(tmp_path):
    import imagehash

    lookalike_photos(tmp_path)
    one, other = (Image.open(tmp_path / n) for n in ("one.png", "other.png"))
    assert imagehash.phash(one) - imagehash.phash(other) <= 4  # a candidate for the coarse hash...
    (tmp_path / "labels.csv").write_text("image,weight\none.png,1\nother.png,2\none-again.jpg,1\n")
    result = mdn("check-data", tmp_path / "labels.csv", "--output", tmp_path / "check")
    pairs = {frozenset((p["image_a"], p["image_b"])) for p in csv.DictReader(open(tmp_path / "check" / "duplicates.csv"))}
    assert pairs == {frozenset(("one.png", "one-again.jpg"))}, result.output  # ...not a copy for the fine one


def test_training_warns_about_copies_across_splits_before_epoch_1(tmp_path, toy_data):
    root = tmp_path / "leaky"
    (root / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(toy_data / "labels.csv")))[:40]
    for r in rows:
        shutil.copy(toy_data / r["image"], root / r["image"])
    shutil.copy(toy_data / rows[0]["image"], root / "images" / "copy.png")
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "weight", "split"])
        for i, r in enumerate(rows):
            writer.writerow([r["image"], r["weight"], "train" if i < 24 else "val" if i < 32 else "test"])
        writer.writerow(["images/copy.png", rows[0]["weight"], "test"])
    config = write_config(tmp_path / "c.yaml", root, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    result = mdn("train", config)
    assert result.exit_code == 0, result.output
    assert "warning: 1 photos have an exact copy in another split (images/00000.png (train) = images/copy.png (test))" \
           in result.output and "mdn check-data" in result.output
