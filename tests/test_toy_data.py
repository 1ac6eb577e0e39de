"""Tests for scripts/make_toy_data.py (the synthetic "puppies" dataset)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).parents[1] / "scripts" / "make_toy_data.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("make_toy_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toy = _load_module()

N_SMALL = 30


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _truth_arrays(path: Path) -> dict[str, np.ndarray]:
    header, rows = _read_csv(path)
    out: dict[str, np.ndarray] = {"image": np.array([r[0] for r in rows])}
    for j, name in enumerate(header[1:], start=1):
        out[name] = np.array([float(r[j]) for r in rows])
    return out


def _labels(path: Path) -> tuple[list[str], np.ndarray]:
    _, rows = _read_csv(path)
    return [r[0] for r in rows], np.array([float(r[1]) for r in rows])


def _latents(truth: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Recover the visible latents from the truth table: std = 0.4 + 0.8 s, mean_1 = 4 + 8 s + 3 c."""
    s = (truth["std_1"] - 0.4) / 0.8
    c = (truth["mean_1"] - 4.0 - 8.0 * s) / 3.0
    return s, c


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_small")
    labels = toy.make_toy_dataset(out, n=N_SMALL, seed=0, size=64)
    assert labels == out / "labels.csv"
    return out


def test_files_written_and_counts_match(small: Path):
    assert (small / "labels.csv").is_file()
    assert (small / "truth.csv").is_file()
    readme = (small / "README.md").read_text(encoding="utf-8").strip().splitlines()
    assert len(readme) == 2 and "make_toy_data.py" in readme[1] and "--seed 0" in readme[1]

    header, rows = _read_csv(small / "labels.csv")
    assert header == ["image", "weight"]
    assert len(rows) == N_SMALL
    names = [r[0] for r in rows]
    assert names[0] == "images/00000.png" and names[-1] == f"images/{N_SMALL - 1:05d}.png"
    on_disk = sorted(p.relative_to(small).as_posix() for p in (small / "images").iterdir())
    assert on_disk == sorted(names)
    for name in names[:5]:
        with Image.open(small / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
    # 4 decimals for labels
    assert all(len(r[1].split(".")[1]) == 4 for r in rows)


def test_labels_and_truth_agree(small: Path):
    names, w = _labels(small / "labels.csv")
    header, _ = _read_csv(small / "truth.csv")
    assert header == ["image", "weight_1", "mean_1", "std_1", "weight_2", "mean_2", "std_2"]
    t = _truth_arrays(small / "truth.csv")
    assert list(t["image"]) == names
    assert np.all(w > 0)
    np.testing.assert_allclose(t["weight_1"], 0.5)
    np.testing.assert_allclose(t["weight_2"], 0.5)
    np.testing.assert_allclose(t["mean_2"] - t["mean_1"], 5.0, atol=2e-6)
    np.testing.assert_allclose(t["std_1"], t["std_2"])
    s, c = _latents(t)
    assert np.all((s >= 0) & (s <= 1)) and np.all((c >= -1e-5) & (c <= 1 + 1e-5))
    # every label lies within a few std of one of the two modes
    z = np.minimum(np.abs(w - t["mean_1"]), np.abs(w - t["mean_2"])) / t["std_1"]
    assert np.all(z < 5.0)


def test_deterministic_given_seed(small: Path, tmp_path: Path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    toy.make_toy_dataset(again, n=N_SMALL, seed=0)
    toy.make_toy_dataset(other, n=N_SMALL, seed=1)
    for f in ("labels.csv", "truth.csv"):
        assert (small / f).read_bytes() == (again / f).read_bytes()
        assert (small / f).read_bytes() != (other / f).read_bytes()
    for p in sorted((small / "images").iterdir()):
        assert p.read_bytes() == (again / "images" / p.name).read_bytes()
    n_diff = sum(
        p.read_bytes() != (other / "images" / p.name).read_bytes()
        for p in (small / "images").iterdir()
    )
    assert n_diff == N_SMALL


def test_labels_do_not_depend_on_image_size(small: Path, tmp_path: Path):
    toy.make_toy_dataset(tmp_path, n=N_SMALL, seed=0, size=16)
    assert (tmp_path / "labels.csv").read_bytes() == (small / "labels.csv").read_bytes()
    assert (tmp_path / "truth.csv").read_bytes() == (small / "truth.csv").read_bytes()
    with Image.open(tmp_path / "images" / "00000.png") as im:
        assert im.size == (16, 16)


def test_overwrite_removes_stale_images(tmp_path: Path):
    toy.make_toy_dataset(tmp_path, n=12, seed=3, size=16)
    (tmp_path / "images" / "stale.txt").write_text("x")
    toy.make_toy_dataset(tmp_path, n=5, seed=3, size=16)
    names, _ = _labels(tmp_path / "labels.csv")
    on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "images").iterdir())
    assert on_disk == sorted(names) and len(names) == 5


def _blob_stats(path: Path) -> tuple[float, np.ndarray]:
    """Blob pixel area (threshold against the border-estimated background) and mean blob colour."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((a - bg) ** 2).sum(axis=2))
    mask = dist > 40.0
    return float(mask.sum()), a[mask].mean(axis=0)


def test_visible_size_and_colour_are_in_the_image(small: Path):
    t = _truth_arrays(small / "truth.csv")
    s, c = _latents(t)
    size_part = 8.0 * s  # the size-dependent part of mean_1
    stats = [_blob_stats(small / name) for name in t["image"]]
    area = np.array([st[0] for st in stats])
    colour = np.array([st[1] for st in stats])
    assert np.corrcoef(area, size_part)[0, 1] > 0.9
    assert np.corrcoef(np.sqrt(area), size_part)[0, 1] > 0.95
    # the blob area is close to pi r^2 with r = (0.10 + 0.30 s) * 64
    expected = np.pi * ((0.10 + 0.30 * s) * 64) ** 2
    assert np.median(np.abs(area / expected - 1.0)) < 0.1
    # colour: mean blob brightness grows with c (dark brown -> light golden)
    assert np.corrcoef(colour.mean(axis=1), c)[0, 1] > 0.9


def test_truth_mixture_is_consistent_with_labels(tmp_path: Path):
    # labels/truth do not depend on the image size (tested above), so use tiny images for speed
    toy.make_toy_dataset(tmp_path, n=2000, seed=7, size=16)
    names, w = _labels(tmp_path / "labels.csv")
    t = _truth_arrays(tmp_path / "truth.csv")
    m1, m2, sd = t["mean_1"], t["mean_2"], t["std_1"]

    # PIT of each label under its true mixture CDF is ~ U(0, 1)
    pit = 0.5 * _norm_cdf((w - m1) / sd) + 0.5 * _norm_cdf((w - m2) / sd)
    pit = np.sort(pit)
    n = len(pit)
    grid = np.arange(1, n + 1) / n
    ks = max(np.max(grid - pit), np.max(pit - (grid - 1.0 / n)))
    assert ks < 0.05

    # mean log-likelihood of the labels ~ its expectation under the truth (Monte Carlo)
    def loglik(x: np.ndarray) -> np.ndarray:
        def comp(m):
            return -0.5 * ((x - m) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)

        a, b = comp(m1), comp(m2)
        hi = np.maximum(a, b)
        return math.log(0.5) + hi + np.log(np.exp(a - hi) + np.exp(b - hi))

    rng = np.random.default_rng(123)
    expected = []
    for _ in range(20):
        k = rng.integers(0, 2, size=n)
        x = np.where(k == 1, m2, m1) + sd * rng.normal(size=n)
        expected.append(loglik(x).mean())
    assert abs(loglik(w).mean() - float(np.mean(expected))) < 0.08
    # about half of the labels come from the upper ("heavier breed") mode
    upper = np.abs(w - m2) < np.abs(w - m1)
    assert 0.45 < upper.mean() < 0.55


def test_cli_main_and_argument_errors(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert toy.main(["--out", str(out), "--n", "3", "--seed", "2", "--size", "16"]) in (0, None)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "3" in printed[0] and str(out) in printed[0]
    assert len(list((out / "images").iterdir())) == 3

    for bad in (["--n", "0"], ["--size", "8"]):
        with pytest.raises(SystemExit) as e:
            toy.main(["--out", str(tmp_path / "bad"), *bad])
        assert e.value.code == 2
        assert "must be" in capsys.readouterr().err
    with pytest.raises(ValueError):
        toy.make_toy_dataset(tmp_path / "bad2", n=0)
    with pytest.raises(ValueError):
        toy.make_toy_dataset(tmp_path / "bad3", n=3, size=10)
    assert not (tmp_path / "bad").exists()


def test_runs_as_a_script(tmp_path: Path):
    import subprocess

    out = tmp_path / "script"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--n", "2", "--size", "16"],
        capture_output=True,
        text=True,
    )  # no timeout: the script only computes and writes a few files, it cannot wait on anything
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    assert (out / "labels.csv").is_file()
