"""Deep ensembles as mixtures, aleatoric and epistemic stds, and the unfamiliar-image warning."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, write_config
from PIL import Image
from typer.testing import CliRunner

from mdn_cli import mixture as mx
from mdn_cli.cli import app
from mdn_cli.data.folder import unlabelled
from mdn_cli.inference import Predictor
from mdn_cli.ood import (
    FeatureBank,
    UnfamiliarImages,
    threshold_rank,
)
from mdn_cli.runtime import Runtime

CPU = Runtime(torch.device("cpu"), None)


def mdn(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members (seeds 0 and 1) trained on the same 300 toy images and split, with ~90
    calibration images and the warning at the 0.9 quantile (a 0.99 one would need 99 images)."""
    tmp = tmp_path_factory.mktemp("ens")
    data = tmp / "toy"
    load_script("make_toy_data").make_toy_dataset(data, n=300, seed=4, size=32)
    config = write_config(tmp / "c.yaml", data, tmp / "runs", data={"val_fraction": 0.15, "calibration_fraction": 0.3, "test_fraction": 0.2},
                          train={"epochs": 2, "batch_size": 16, "early_stopping_patience": None, "ood_quantile": 0.9})
    result = mdn("train", config, "--members", "2")
    assert result.exit_code == 0, result.output
    return tmp, data, config


def hostile_images(folder: Path) -> dict[str, list[Path]]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    out = {"noise": [], "solid": []}
    for i in range(10):
        out["noise"].append(folder / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(out["noise"][-1])
        out["solid"].append(folder / f"solid{i}.png")
        Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 256, 3))).save(out["solid"][-1])
    return out


def test_train_members_builds_an_ensemble_run_folder(members):
    tmp, data, _ = members
    for name in ("tiny-1", "tiny-2"):
        assert (tmp / "runs" / name / "best.pt").is_file()
    folder = tmp / "runs" / "tiny"
    assert {p.name for p in folder.iterdir()} >= {"best.pt", "splits.csv", "config.yaml", "eval"}
    assert (folder / "splits.csv").read_bytes() == (tmp / "runs/tiny-1/splits.csv").read_bytes()
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["method"] == "conformal" and "unfamiliar" in metrics
    result = mdn("predict", data / "images" / "00000.png", data / "images" / "00001.png", "-c", folder / "best.pt")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[1]
    assert "aleatoric" in header and "epistemic" in header


def test_an_ensemble_of_two_is_exactly_the_mixture_of_both(members):
    tmp, data, _ = members
    images = sorted((data / "images").glob("*.png"))[:12]
    ens, _ = Predictor.from_checkpoint(tmp / "runs/tiny/best.pt", CPU)
    singles = [Predictor.from_checkpoint(tmp / f"runs/tiny-{i}/best.pt", CPU)[0] for i in (1, 2)]
    source, examples = unlabelled(images)

    def run(p):
        return p.run(p.loader(source, examples, num_workers=0), CPU)

    e_pred = run(ens)
    raw = ens.mixture(e_pred, calibrated=False)
    parts = [p.mixture(run(p), calibrated=False) for p in singles]
    torch.testing.assert_close(raw.weights, torch.cat([p.weights for p in parts], 1) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(raw.means, torch.cat([p.means for p in parts], 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(raw.stds, torch.cat([p.stds for p in parts], 1), rtol=0, atol=1e-12)

    # the records' summaries are the mixture maths of the (calibrated) components
    out = mdn("predict", *images, "-c", tmp / "runs/tiny/best.pt", "-f", "json")
    assert out.exit_code == 0, out.output
    for r in json.loads(out.stdout):
        comps = r["components"]
        assert len(comps) == 4 and {c["member"] for c in comps} == {0, 1}
        assert sum(c["weight"] for c in comps) == pytest.approx(1.0, abs=1e-12)
        assert sum(c["weight"] for c in comps if c["member"] == 0) == pytest.approx(0.5, abs=1e-12)
        w, mu, sd = (torch.tensor([[c[k] for c in comps]], dtype=torch.float64) for k in ("weight", "mean", "std"))
        m = mx.Mixture(w, mu, sd)
        assert r["mean"] == pytest.approx(float(mx.mean(m)), rel=1e-12) and r["std"] == pytest.approx(float(mx.std(m)), rel=1e-12)
        # law of total variance over members
        means, variances = [], []
        for k in (0, 1):
            sel = [c for c in comps if c["member"] == k]
            part = mx.Mixture(*(torch.tensor([[c[key] * (2 if key == "weight" else 1) for c in sel]], dtype=torch.float64)
                                for key in ("weight", "mean", "std")))
            means.append(float(mx.mean(part)))
            variances.append(float(mx.std(part)) ** 2)
        assert r["std_aleatoric"] == pytest.approx(math.sqrt(sum(variances) / 2), rel=1e-9)
        assert r["std_epistemic"] == pytest.approx(abs(means[0] - means[1]) / 2, rel=1e-9)
        assert r["std"] ** 2 == pytest.approx(r["std_aleatoric"] ** 2 + r["std_epistemic"] ** 2, rel=1e-9)


def test_a_single_model_has_no_epistemic_part(members):
    tmp, data, _ = members
    out = mdn("predict", data / "images" / "00003.png", "-c", tmp / "runs/tiny-1/best.pt", "-f", "json")
    r = json.loads(out.stdout)[0]
    assert r["std_epistemic"] == 0.0 and r["std_aleatoric"] == pytest.approx(r["std"], rel=1e-12)
    csv_out = mdn("predict", data / "images" / "00003.png", "-c", tmp / "runs/tiny-1/best.pt", "-f", "csv").stdout
    assert "std_aleatoric,std_epistemic" in csv_out.splitlines()[0]


def test_mismatched_members_are_refused(members, tmp_path):
    tmp, data, config = members
    one = tmp / "runs/tiny-1/best.pt"
    result = mdn("ensemble", one, "-o", tmp_path / "e1")
    assert result.exit_code == 2 and "at least 2 members" in result.output
    # another split: the ensemble could not find calibration images no member trained on
    other = write_config(tmp_path / "o.yaml", data, tmp_path / "runs", run={"name": "other"}, train={"epochs": 1, "batch_size": 16},
                         data={"split_seed": 7})
    assert mdn("train", other).exit_code == 0
    result = mdn("ensemble", one, tmp_path / "runs/other/best.pt", "-o", tmp_path / "e2")
    assert result.exit_code == 2 and "different split" in result.output and "data.split_seed" in result.output
    # another target transform
    logged = write_config(tmp_path / "l.yaml", data, tmp_path / "runs", run={"name": "logged"}, train={"epochs": 1, "batch_size": 16},
                          data={"target_transform": "log", "val_fraction": 0.15, "calibration_fraction": 0.3, "test_fraction": 0.2})
    assert mdn("train", logged).exit_code == 0
    result = mdn("ensemble", one, tmp_path / "runs/logged/best.pt", "-o", tmp_path / "e3")
    assert result.exit_code == 2 and "target_transform" in result.output
    # a member whose run folder is gone
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(one, lonely / "best.pt")
    result = mdn("ensemble", one, lonely / "best.pt", "-o", tmp_path / "e4")
    assert result.exit_code == 2 and "splits.csv" in result.output
    assert not any((tmp_path / f"e{i}" / "best.pt").exists() for i in range(1, 5))


# --- the unfamiliar-image warning ---------------------------------------------------------------


def test_noise_and_solid_colours_are_flagged_and_familiar_images_rarely(members, tmp_path):
    tmp, data, _ = members
    hostile = hostile_images(tmp_path / "hostile")
    for checkpoint in (tmp / "runs/tiny-1/best.pt", tmp / "runs/tiny/best.pt"):  # a model and an ensemble
        for kind, paths in hostile.items():
            out = mdn("predict", *paths, "-c", checkpoint, "-f", "json")
            rows = json.loads(out.stdout)
            assert all(not r["in_distribution"] and r["ood_score"] > 1 for r in rows), (checkpoint, kind)
        table = mdn("predict", hostile["noise"][0], "-c", checkpoint).stdout
        assert "⚠" in table and "unlike the images the model was trained on" in table
        metrics = json.loads((checkpoint.parent / "eval" / "metrics.json").read_text())["unfamiliar"]
        assert metrics["quantile"] == 0.9 and metrics["flagged_fraction"] <= 0.3  # ~10% expected of ~60 test images
        rows = list(csv.DictReader(open(checkpoint.parent / "eval" / "predictions.csv")))
        assert sum(float(r["ood_score"]) > 1 for r in rows) == metrics["flagged_images"]  # which test images were flagged


def test_the_warnings_scales_come_from_val_and_its_threshold_from_calibration(members):
    """The images that set the threshold fit nothing else (the scales of the distances are fitted on val)."""
    from mdn_cli.inference import Predictor

    tmp, data, _ = members
    best = tmp / "runs/tiny-1/best.pt"
    predictor, _ = Predictor.from_checkpoint(best, CPU)
    rows = list(csv.DictReader(open(best.parent / "splits.csv")))
    def features_of(split):
        source, examples = unlabelled([data / r["image"] for r in rows if r["split"] == split])
        return predictor.run(predictor.loader(source, examples, num_workers=0), CPU).features[0]

    features = {split: features_of(split) for split in ("val", "calibration")}
    bank = predictor.members[0].bank

    def medians(vectors):
        return [float(FeatureBank([b], [1.0], bank.k).distances([x]).median()) for b, x in zip(bank.vectors, vectors)]

    assert bank.scales == pytest.approx(medians(features["val"]), rel=1e-4)
    assert bank.scales != pytest.approx(medians(features["calibration"]), rel=1e-4)
    scores = torch.stack([bank.distances(features["calibration"])]).mean(0).sort().values
    m, _ = threshold_rank(len(scores), 0.9)
    assert predictor.unfamiliar.threshold == pytest.approx(float(scores[m - 1]), rel=1e-4)


def test_the_threshold_flags_at_most_the_configured_share_of_familiar_images():
    """Conformal, like the intervals: over many draws of bank, calibration and new images from one
    distribution, the share of new images flagged is at most 1 - q (and above 1 - q - 1/(n+1))."""
    g = torch.Generator().manual_seed(0)
    n, q, trials, flagged = 49, 0.9, 400, 0.0
    for _ in range(trials):
        bank = FeatureBank.of([torch.randn(200, 8, generator=g) + 3])
        val, cal, new = (torch.randn(m, 8, generator=g) + 3 for m in (40, n, 50))
        model = UnfamiliarImages.fit([bank], [[val]], [[cal]], q)
        flagged += float((model.scores([[new]]) > 1).double().mean()) / trials
    slack = 4 * math.sqrt(q * (1 - q) / (trials * 50)) + 0.01  # the new images of one draw share its threshold
    assert 1 - q - 1 / (n + 1) - slack <= flagged <= 1 - q + slack
    far = UnfamiliarImages.fit([FeatureBank.of([torch.randn(200, 8, generator=g) + 3])], [[torch.randn(40, 8, generator=g) + 3]],
                               [[torch.randn(n, 8, generator=g) + 3]], q)
    assert bool((far.scores([[-torch.randn(20, 8, generator=g) - 3]]) > 1).all())  # another distribution: all flagged


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large", "efficientnet_lite0"])
def test_stage_statistics_are_those_of_the_last_layer_at_each_resolution_on_every_pass(backbone):
    """Later passes record only the layers the first pass found last at each resolution (speed);
    the vectors must equal those of a pass that records every layer, residual `+=` included."""
    from mdn_cli.backbones import get_backbone
    from mdn_cli.ood import StageStatistics

    torch.manual_seed(0)
    net = get_backbone(backbone).build(False)[0].eval()
    stats = StageStatistics(net)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        net(x)
        first = stats.collect()  # no plan for 64 px yet: this pass finds it
        net(x)
        planned = stats.collect()
        ahead = StageStatistics(net)  # planned ahead, by a one-image pass (what predictors do)
        ahead.plan(64)
        assert ahead.plans == stats.plans
        net(x)
        planned_ahead = ahead.collect()
        hooked = sum(len(m._forward_hooks) for m in net.modules())
        assert 0 < hooked == len(stats.hooked) + len(ahead.hooked) < len(stats.leaves)  # the planned layers only
        stats.remove()
        ahead.remove()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
        latest = {}  # the definition, independently: statistics taken as each layer runs, the last one kept

        def record(module, inputs, output):
            if output.ndim == 4 and min(output.shape[-2:]) > 1:
                latest[tuple(output.shape[-2:])] = torch.cat([output.mean((2, 3)), output.std((2, 3), unbiased=False)], 1)

        for m in net.modules():
            if not list(m.children()):
                m.register_forward_hook(record)
        net(x)
        reference = [latest[k] for k in sorted(latest, reverse=True)]
    assert len(first) == len(planned) == len(planned_ahead) == len(reference) >= 3
    for a, b in zip(planned_ahead, reference):
        torch.testing.assert_close(a, b)
    for a, b in zip(planned, reference):
        torch.testing.assert_close(a, b)
    for a, b in zip(first, reference):
        torch.testing.assert_close(a, b)


def test_threshold_order_statistic_and_too_few_images():
    assert threshold_rank(99, 0.99) == (99, 0.99)  # ceil(0.99 * 100) = 99: the largest
    assert threshold_rank(99, 0.9) == (90, 0.9)
    assert threshold_rank(98, 0.99) == (98, 98 / 99)  # too few for 0.99: the largest score, at the level 98 images support


def test_a_small_calibration_set_still_gets_a_warning_that_says_what_it_holds():
    """800 images (80 calibration images) once lost the warning altogether; now the threshold is the
    largest calibration score, its level n/(n+1) and the noise of its false-flag rate are stated."""
    g = torch.Generator().manual_seed(1)
    bank = FeatureBank.of([torch.randn(200, 8, generator=g)])
    model = UnfamiliarImages.fit([bank], [[torch.randn(40, 8, generator=g)]], [[torch.randn(80, 8, generator=g)]], 0.99)
    assert model.quantile == pytest.approx(80 / 81) and model.asked == 0.99 and math.isfinite(model.threshold)
    described = model.describe()
    assert "80 calibration images are too few for train.ood_quantile=0.99 (it needs 99)" in described["warning"]
    low, high = described["false_flag_rate"]["range_90"]
    assert described["false_flag_rate"]["expected"] == pytest.approx(1 / 81) and 0 < low < 1 / 81 < high < 0.05
    again = UnfamiliarImages.from_state(model.state(), [bank])
    assert (again.quantile, again.asked, again.n_images) == (model.quantile, 0.99, 80)
    assert "between" in model.fitted_message() and "too few" in model.fitted_message()


def test_benchmark_ood_script_reports_each_set(members, capsys):
    from conftest import load_script

    tmp, data, _ = members
    assert load_script("benchmark_ood").main([str(tmp / "runs/tiny-1/best.pt"), "--n", "3", "--other", str(data / "images"),
                                              "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "| random noise | 3 | 100.0% (3) |" in out and "| solid colour | 3 | 100.0% (3) |" in out
    assert "its own test split" in out and f"| {data / 'images'} | 4 |" in out
