"""The training engine: splits that never move, exact resumes (with loader workers), extending a
run, precision and devices, augmentation switches, and the loop's refusal to pretend it trained."""

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_until, write_config
from typer.testing import CliRunner

from mdn_cli import engine
from mdn_cli import train as train_module
from mdn_cli.cli import app
from mdn_cli.data.dataset import Augment, augment_image
from mdn_cli.engine import Segment, schedule_factor
from mdn_cli.data.labels import read_labels
from mdn_cli.model import MDNHead
from mdn_cli.runtime import Runtime, select_runtime
from mdn_cli.data.splits import assign_splits

runner = CliRunner()


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def splits_of(folder: Path, text: str, fractions=(0.15, 0.1, 0.15), seed=0, split_column=None) -> dict[str, str]:
    (folder / "labels.csv").write_text(text)
    examples = read_labels(folder / "labels.csv", folder, "image", "weight", split_column).examples
    plan = assign_splits(examples, folder, *fractions, seed)
    return {e.image: s for e, s in zip(examples, plan.splits)}, plan


# --- splits -------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(1001):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def test_appending_removing_or_reordering_rows_never_moves_another_image(images):
    lines = [f"img/{i}.png,{i}\n" for i in range(1000)]
    base, _ = splits_of(images, "image,weight\n" + "".join(lines))
    appended, _ = splits_of(images, "image,weight\n" + "".join(lines) + "img/1000.png,5\n")
    reordered, _ = splits_of(images, "image,weight\n" + "".join(reversed(lines)))
    removed, _ = splits_of(images, "image,weight\n" + "".join(lines[::2]))
    respelled, _ = splits_of(images, "image,weight\n" + "".join(f"./{line}" for line in lines))
    for other in (appended, reordered, removed):
        assert all(other[k] == v for k, v in base.items() if k in other)
    assert all(respelled[f"./{k}"] == v for k, v in base.items())  # the same image written another way
    counts = {s: sum(v == s for v in base.values()) for s in ("train", "val", "calibration", "test")}
    assert abs(counts["val"] - 150) < 40 and abs(counts["calibration"] - 100) < 35 and abs(counts["test"] - 150) < 40
    other_seed, _ = splits_of(images, "image,weight\n" + "".join(lines), seed=1)
    assert sum(other_seed[k] != v for k, v in base.items()) > 200  # data.split_seed draws another split


def test_a_train_val_test_column_gives_half_of_val_to_calibration(images):
    text = "image,weight,split\n" + "".join(f"img/{i}.png,{i},{('train', 'val', 'test')[i % 3]}\n" for i in range(600))
    splits, plan = splits_of(images, text, split_column="split")
    val = [k for k in splits if int(k.split("/")[1].split(".")[0]) % 3 == 1]
    moved = [k for k in val if splits[k] == "calibration"]
    assert 70 < len(moved) < 130 and all(splits[k] in ("val", "calibration") for k in val)
    assert all(splits[k] == ("train", "val", "test")[int(k.split("/")[1].split(".")[0]) % 3] for k in splits if k not in val)
    assert "calibrate the intervals instead" in plan.note and str(len(moved)) in plan.note
    # a column that names calibration images is taken as it is
    text = "image,weight,split\n" + "".join(f"img/{i}.png,{i},{('train', 'val', 'calibration', 'test')[i % 4]}\n" for i in range(40))
    splits, plan = splits_of(images, text, split_column="split")
    assert plan.note is None and sum(s == "calibration" for s in splits.values()) == 10


def test_resume_reads_the_recorded_split_and_says_what_changed_in_the_labels(tmp_path, toy_data):
    data = Path(shutil.copytree(toy_data, tmp_path / "data"))
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    assert mdn("train", config).exit_code == 0
    recorded = (tmp_path / "runs/tiny/splits.csv").read_text()
    header, first, second, *rest = (data / "labels.csv").read_text().splitlines()
    image, weight, *more = first.split(",")
    shutil.copy(data / "images" / "00001.png", data / "images" / "new.png")
    added = ",".join(["images/new.png", "7.5", *more])
    # relabel one image, drop another, add a new one
    (data / "labels.csv").write_text("\n".join([header, ",".join([image, str(float(weight) + 1), *more]), *rest, added]) + "\n")
    result = mdn("train", config, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "changed since this run started (1 images added, 1 removed, 1 relabelled)" in result.output
    assert (tmp_path / "runs/tiny/splits.csv").read_text() == recorded  # the run keeps its own data
    (data / "labels.csv").unlink()  # even without the labels file, the run can continue
    result = mdn("train", config, "--resume", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output


# --- resume, extend -----------------------------------------------------------------------------


def test_resume_with_loader_workers_matches_an_uninterrupted_run(tmp_path, toy_data):
    """Ctrl-C in epoch 2 with the default loader workers and dropout on, then --resume: the same
    final weights as a run never interrupted (the workers once drew their seed from the global
    random stream, so the resumed epoch's dropout differed)."""
    common = dict(train={"epochs": 2, "batch_size": 8, "early_stopping_patience": None},
                  model={"backbone": "resnet18", "pretrained": False, "components": 2, "dropout": 0.3})
    data = {"num_workers": 2}
    straight = write_config(tmp_path / "a.yaml", toy_data, tmp_path / "runs", run={"name": "straight"}, data=data, **common)
    stopped = write_config(tmp_path / "b.yaml", toy_data, tmp_path / "runs", run={"name": "stopped"}, data=data, **common)
    assert mdn("train", straight).exit_code == 0
    run = tmp_path / "runs" / "stopped"
    returncode, err = train_until(stopped, "train-batch#5")  # in epoch 2 (3 or 4 batches an epoch), workers running
    assert returncode == 130, err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    result = mdn("train", stopped, "--resume")
    assert result.exit_code == 0, result.output
    a = torch.load(tmp_path / "runs/straight/last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key  # bit for bit on the CPU
    assert [r["val_nll"] for r in b["history"]] == [r["val_nll"] for r in a["history"]]


def test_schedule_segments():
    one = [Segment(0, 10, 1.0)]
    assert schedule_factor(0, one, 4) == pytest.approx(0.25)  # linear warm-up over 4 steps
    assert schedule_factor(3, one, 4) == pytest.approx(1.0)
    assert schedule_factor(39, one, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 35 / 36)))
    restart = [Segment(0, 10, 1.0), Segment(10, 14, 0.5, 0.3)]
    assert schedule_factor(39, restart, 4) == schedule_factor(39, one, 4)  # the original stretch is kept
    assert schedule_factor(40, restart, 4) == pytest.approx(0.3 * 1 / 2)
    assert schedule_factor(41, restart, 4) == pytest.approx(0.3)  # the stated peak
    assert schedule_factor(55, restart, 4) < 0.01  # decays to zero at the new end


def test_raising_epochs_on_resume_is_a_stated_warm_restart(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs",
                          train={"epochs": 2, "batch_size": 8, "lr": 1e-3, "early_stopping_patience": 1, "extend_lr_scale": 0.3})
    assert mdn("train", config).exit_code == 0
    result = mdn("train", config, "--resume", "--set", "train.epochs=5")
    assert result.exit_code == 0, result.output
    assert "train.epochs raised from 2 to 5" in result.output and "warm restart" in result.output
    assert "to lr 3.00e-04" in result.output
    lrs = [float(r["lr"]) for r in rows(tmp_path / "runs/tiny/metrics.csv")]
    assert lrs[1] == 0.0  # the first run ended its cosine at zero
    assert 0 < lrs[2] <= 3e-4 + 1e-12 and lrs[3] < lrs[2] and lrs[4] == pytest.approx(0.0, abs=1e-12)
    assert len(lrs) == 5  # early stopping (patience 1) counts from the restart, not from epoch 1
    last = torch.load(tmp_path / "runs/tiny/last.pt", weights_only=True)
    assert [s["start"] for s in last["schedule"]] == [0, 2]
    # lowering it stops earlier on the same schedule, and says so
    result = mdn("train", config, "--overwrite", "--set", "train.epochs=4")
    assert result.exit_code == 0
    (tmp_path / "runs/tiny/metrics.csv").unlink()
    last = torch.load(tmp_path / "runs/tiny/last.pt", weights_only=True)
    last["epoch"], last["history"] = 1, last["history"][:1]
    torch.save(last, tmp_path / "runs/tiny/last.pt")
    result = mdn("train", config, "--resume", "--set", "train.epochs=3")
    assert result.exit_code == 0 and "lowered from 4 to 3" in result.output


def test_resume_removes_temp_files_of_a_killed_process(tiny_config, tmp_path):
    assert mdn("train", tiny_config, "--set", "train.epochs=1").exit_code == 0
    stale = tmp_path / "runs/tiny/.last.pt.12345.tmp"
    stale.write_bytes(b"x" * 1000)
    result = mdn("train", tiny_config, "--resume")
    assert result.exit_code == 0 and not stale.exists() and "unfinished temporary file" in result.output


def test_a_start_that_failed_before_its_first_epoch_is_not_a_run_to_protect(tiny_config, tmp_path):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("stale")
    (run / "splits.csv").write_text("stale")
    (run / "notes.txt").write_text("mine")
    result = mdn("train", tiny_config, "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output  # no --resume or --overwrite needed
    assert (run / "notes.txt").read_text() == "mine"  # never touched: not a file mdn writes
    assert mdn("train", tiny_config, "--resume").exit_code == 0


# --- precision and devices ----------------------------------------------------------------------


def test_the_mdn_head_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    head = MDNHead(64, 3, dropout=0.0).eval()
    x = torch.randn(8, 64).bfloat16()  # features as a bf16 backbone gives them
    reference = head(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = head(x)
    for a, b in zip(reference, under):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # bf16 features are exact in fp32; nothing else rounded


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_never_picks_emulated_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    runtime = select_runtime("cuda", "auto")
    assert runtime.amp_dtype == expected and runtime.needs_grad_scaler == (expected == torch.float16)
    assert select_runtime("cuda", "fp32").amp_dtype is None


@pytest.mark.parametrize("native", [True, False])
def test_cpu_training_steps_use_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    from mdn_cli.errors import ConfigError

    monkeypatch.setenv("MDN_CPU_BF16", "1" if native else "0")
    runtime = select_runtime("cpu", "auto")
    assert runtime.amp_dtype is None and runtime.cpu_bf16_steps == native
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with runtime.step_autocast():
        assert conv(x).dtype == (torch.bfloat16 if native else torch.float32)
    with runtime.autocast():
        assert conv(x).dtype == torch.float32
    assert not select_runtime("cpu", "fp32").cpu_bf16_steps
    assert not select_runtime("cpu", "auto", what="--precision").cpu_bf16_steps  # prediction: fp32, as onnxruntime's
    if native:
        assert select_runtime("cpu", "bf16").cpu_bf16_steps
    else:
        with pytest.raises(ConfigError, match="train.precision: bf16 needs a CUDA GPU or a CPU with native bf16"):
            select_runtime("cpu", "bf16")


def test_bf16_training_steps_leave_every_pass_that_calibrates_or_measures_in_fp32(tiny_config, monkeypatch):
    """With bf16 steps on a CPU, the backbone computes in bf16 while it trains and while validation
    picks the epoch, and in fp32 for calibration, the feature bank and the test split: the
    intervals and the numbers a run reports are fp32's."""
    from mdn_cli import interrupts

    monkeypatch.setenv("MDN_CPU_BF16", "1")
    moment, seen = ["start"], set()
    reached = interrupts.reached

    def record_moment(name):  # the named moments the code reports, as the interrupt sweeps use them
        moment[0] = name
        reached(name)

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.add((moment[0], output.dtype))

    monkeypatch.setattr(interrupts, "reached", record_moment)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = mdn("train", tiny_config, "--set", "train.epochs=1", "--set", "train.unfreeze_after=null")
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    assert "bf16 training steps" in result.output
    dtypes = {name: {dtype for m, dtype in seen if m == name} for name, _ in seen}
    assert dtypes["train-batch"] == {torch.bfloat16} and dtypes["val-batch"] == {torch.bfloat16}
    assert dtypes["calibration-batch"] == {torch.float32} and dtypes["evaluation-batch"] == {torch.float32}
    # after "model-built" comes the ETA's probe, which times training steps on a copy of the model
    assert all(d == {torch.float32} for name, d in dtypes.items() if name not in ("train-batch", "val-batch", "model-built")), dtypes
    assert "checkpoint-loaded" in dtypes  # the feature bank and calibration, from best.pt


def test_inference_defaults_to_fp32_and_names_its_own_option(monkeypatch):
    from mdn_cli.errors import ConfigError

    assert select_runtime("cpu", "fp32", what="--precision").amp_dtype is None
    with pytest.raises(ConfigError, match="--precision: bf16 needs a CUDA GPU"):
        select_runtime("cpu", "bf16", what="--precision")
    with pytest.raises(ConfigError, match="^--device: cuda requested"):
        select_runtime("cuda", "fp32", what="--precision")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="run.device: mps requested"):
        select_runtime("mps")


def test_nothing_but_float32_and_uint8_reaches_the_device(tiny_config, monkeypatch):
    """MPS has no float64: every tensor the step and the val pass send to the model or the loss is
    float32 (targets and masks) or uint8 (images); float64 maths stays on the CPU."""
    seen: list[torch.dtype] = []
    real_values, real_images, real_nll = Runtime.values, Runtime.images, engine.mixture_nll
    monkeypatch.setattr(Runtime, "values", lambda self, x: seen.append(real_values(self, x).dtype) or real_values(self, x))
    monkeypatch.setattr(Runtime, "images", lambda self, x: seen.append(real_images(self, x).dtype) or real_images(self, x))
    monkeypatch.setattr(engine, "mixture_nll", lambda *a: seen.extend(t.dtype for t in a) or real_nll(*a))
    assert mdn("train", tiny_config, "--set", "train.epochs=1").exit_code == 0
    assert seen and set(seen) <= {torch.float32, torch.uint8}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_training_and_resume_across_a_precision_change(tiny_config, tmp_path, monkeypatch, dtype):
    """bf16 and fp16 autocast (fp16 with a gradient scaler) through the real loop, on the CPU's
    autocast; then resume a fp32 run in reduced precision (its saved gradient scaler is empty)."""
    assert mdn("train", tiny_config, "--set", "train.epochs=1").exit_code == 0
    reduced = Runtime(torch.device("cpu"), dtype)
    monkeypatch.setattr(train_module, "select_runtime", lambda *a, **k: reduced)
    result = mdn("train", tiny_config, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert ("gradient scaler starts afresh" in result.output) == (dtype == torch.float16)
    last = torch.load(tmp_path / "runs/tiny/last.pt", weights_only=True)
    assert last["epoch"] == 2 and all(v.dtype != torch.bfloat16 for v in last["model"].values())
    assert bool(last["grad_scaler"]) == (dtype == torch.float16)
    assert math.isfinite(float(rows(tmp_path / "runs/tiny/metrics.csv")[-1]["val_nll"]))


# --- augmentation -------------------------------------------------------------------------------


def test_shifts_repeat_the_border_and_never_mirror_an_object_into_a_second_copy():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, 1:3] = 255  # a thin object next to the left edge
    copies = set()
    for seed in range(200):
        out = augment_image(image, Augment(shift=True), torch.Generator().manual_seed(seed))
        bright = (out[0] > 0).any(0).int()
        copies.add(int((bright[1:] - bright[:-1]).clamp_min(0).sum() + bright[0]))  # separate bright runs
    assert copies == {1}  # reflect padding would show two objects for shifts to the right


def test_augmentation_switches():
    image = torch.arange(3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 16, 16)
    outs = {name: [augment_image(image, aug, torch.Generator().manual_seed(s)) for s in range(40)]
            for name, aug in (("flip", Augment(flip=True)), ("shift", Augment(shift=True)), ("none", Augment()))}
    assert all(torch.equal(o, image) or torch.equal(o, image.flip(-1)) for o in outs["flip"])
    assert any(torch.equal(o, image.flip(-1)) for o in outs["flip"])
    assert not any(torch.equal(o, image.flip(-1)) for o in outs["shift"]) and any(not torch.equal(o, image) for o in outs["shift"])
    assert all(torch.equal(o, image) for o in outs["none"]) and not Augment()


def test_old_augment_key_points_to_the_new_switches(tmp_path):
    from mdn_cli.config import load_config
    from mdn_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="data.augment: unknown key"):
        load_config(None, ["data.augment=false"])


# --- the loop refuses to pretend ----------------------------------------------------------------


def test_an_epoch_without_a_single_optimisation_step_is_an_error(tiny_config, monkeypatch):
    monkeypatch.setattr(engine.Fitter, "step", lambda self, batch: engine.StepResult("too_small"))
    result = mdn("train", tiny_config)
    assert result.exit_code == 2 and "took no optimisation step" in result.output and "Traceback" not in result.output


def test_batches_of_one_image_train(tiny_config, tmp_path):
    result = mdn("train", tiny_config, "--set", "train.batch_size=1", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert float(rows(tmp_path / "runs/tiny/metrics.csv")[0]["images_per_s"]) > 0


def test_running_the_model_leaves_every_submodule_in_its_own_mode():
    """Validation and feature caching run the network in eval mode in between training steps; they
    must hand back a frozen backbone still in eval mode and a head still training (with dropout)."""
    from mdn_cli.data.dataset import Batch
    from mdn_cli.engine import set_train_mode
    from mdn_cli.runtime import run_model
    from mdn_cli.model import MDNRegressor, ModelArgs

    model = MDNRegressor(ModelArgs("resnet18", 2, 32, (0.5,) * 3, (0.25,) * 3))
    set_train_mode(model, frozen=True, global_batch=32)
    before = {name: m.training for name, m in model.named_modules()}
    batch = Batch(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.float64), torch.arange(2),
                  torch.full((2,), -1), [])
    run_model(model, [batch], Runtime(torch.device("cpu"), None), print)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.head.training and not model.backbone.training
