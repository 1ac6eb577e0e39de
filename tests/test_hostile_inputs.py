"""Hostile inputs: broken images, messy label files, untrusted checkpoints. Each ends in one clear
line naming the file (and line or key) or in a logged skip, never a traceback."""

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from PIL import Image
from typer.testing import CliRunner

from mdn_cli.checkpoint import load_checkpoint, save_checkpoint
from mdn_cli.cli import app
from mdn_cli.config import load_config
from mdn_cli.errors import CheckpointError, DataError, WriteError
from mdn_cli.images import UnreadableImageError, load_rgb
from mdn_cli.data.labels import read_labels
from mdn_cli.data.splits import assign_splits, check_split_sizes
from mdn_cli.train import Training

runner = CliRunner()


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- images --------------------------------------------------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def make_broken(kind: str, path: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text_named_jpg":
        path.write_text("hello, I am not a photo\n")
    elif kind == "truncated_jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "unknown_format":
        path.write_bytes(b"8BPS\x00\x01" + bytes(200))  # a Photoshop signature PIL cannot decode
    elif kind == "decompression_bomb":
        png_header_only(path, 60_000, 60_000)
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize("kind", ["empty", "text_named_jpg", "truncated_jpeg", "unknown_format", "decompression_bomb", "missing"])
def test_unreadable_images_raise_one_line_naming_the_file(tmp_path, kind):
    path = make_broken(kind, tmp_path / f"{kind}.jpg")
    with pytest.raises(UnreadableImageError) as e:
        load_rgb(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    if kind == "decompression_bomb":
        assert "decompression bomb" in str(e.value)


def make_image(kind: str, path: Path) -> tuple[Path, tuple[int, int]]:
    """Writes an image of an unusual kind; returns its path and the expected upright (w, h)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    if kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path.with_suffix(".jpg"))
        return path.with_suffix(".jpg"), (40, 30)
    if kind == "16bit":
        Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(path.with_suffix(".png"))
        return path.with_suffix(".png"), (40, 30)
    if kind == "palette_transparent":
        im = Image.fromarray(rgb).convert("P")
        im.info["transparency"] = 0
        im.save(path.with_suffix(".png"), transparency=0)
        return path.with_suffix(".png"), (40, 30)
    if kind == "grayscale":
        Image.fromarray(rgb[..., 0]).save(path.with_suffix(".png"))
        return path.with_suffix(".png"), (40, 30)
    if kind == "rgba":
        Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path.with_suffix(".png"))
        return path.with_suffix(".png"), (40, 30)
    if kind == "exif_rotated":
        im = Image.fromarray(rgb)
        exif = im.getexif()
        exif[0x0112] = 6  # "rotate 90 CW to view": the upright image is 30 wide, 40 high
        im.save(path.with_suffix(".jpg"), exif=exif)
        return path.with_suffix(".jpg"), (30, 40)
    if kind == "tiny":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path.with_suffix(".png"))
        return path.with_suffix(".png"), (1, 1)
    if kind == "large":
        Image.new("RGB", (6000, 4000), (10, 200, 10)).save(path.with_suffix(".jpg"), quality=50)
        return path.with_suffix(".jpg"), (6000, 4000)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["cmyk", "16bit", "palette_transparent", "grayscale", "rgba", "exif_rotated", "tiny", "large"])
def test_unusual_images_decode_to_upright_rgb(tmp_path, kind):
    path, size = make_image(kind, tmp_path / kind)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == size


def test_16bit_images_keep_their_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    a = np.asarray(load_rgb(tmp_path / "ramp.png"))
    assert a.min() <= 1 and a.max() >= 254  # not crushed to black or white


# --- labels CSV -------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def labels(folder: Path, text: str, encoding="utf-8") -> Path:
    path = folder / "labels.csv"
    path.write_bytes(text.encode(encoding))
    return path


def read(folder, path, transform="none", split_column="split"):
    return read_labels(path, folder, "image", "weight", split_column, transform).examples


def test_labels_file_problems_are_reported_all_at_once_with_lines(folder):
    path = labels(
        folder,
        "image,weight,split\n"
        "img/0.png,5.5,train\n"          # 2 fine
        "img/1.png,heavy,train\n"        # 3 not a number
        "img/2.png,,train\n"             # 4 empty
        "img/3.png,nan,train\n"          # 5 NaN
        "img/4.png,inf,val\n"            # 6 infinite
        "img/nope.png,4,val\n"           # 7 missing image
        "../../etc/passwd,4,val\n"       # 8 escapes the root
        "/etc/passwd,4,val\n"            # 9 absolute
        "img/5.png,4,holdout\n"          # 10 unknown split
        "img/0.png,7.0,train\n",         # 11 same image, different label
    )
    with pytest.raises(DataError) as e:
        read(folder, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 9 problems")
    for line, words in [(3, "'heavy'"), (4, "is not a number"), (5, "not a finite"), (6, "not a finite"), (7, "not found"),
                        (8, "outside data.root"), (9, "outside data.root"), (10, "holdout"), (11, "different label")]:
        assert f"{path}:{line}: " in msg and words in msg


def test_non_positive_targets_under_log(folder):
    path = labels(folder, "image,weight\nimg/0.png,0\nimg/1.png,-2\nimg/2.png,3\n")
    with pytest.raises(DataError, match="target_transform: log") as e:
        read(folder, path, transform="log")
    assert f"{path}:2:" in str(e.value) and f"{path}:3:" in str(e.value)
    assert len(read(folder, path)) == 3  # fine without the log transform


def test_bom_exact_duplicates_and_extra_columns(folder):
    path = labels(folder, "\ufeffimage,weight,notes\nimg/0.png,1.5,a\nimg/0.png,1.5,a\nimg/1.png,2,b\n")
    examples = read(folder, path)
    assert [e.image for e in examples] == ["img/0.png", "img/1.png"]  # the exact duplicate is dropped


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("image,weight\n", "no rows"),
        ("img,weight\nimg/0.png,1\n", "no column 'image'"),
        ("image,wieght\nimg/0.png,1\n", "did you mean 'wieght'"),
        ("\x00\xff\xfe binary", "UTF-8"),
    ],
)
def test_structural_labels_problems(folder, text, words):
    path = folder / "labels.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=words):
        read(folder, path)


def test_missing_labels_file(folder):
    with pytest.raises(DataError, match="labels file not found"):
        read(folder, folder / "nope.csv")


def test_a_split_left_empty_and_too_small_for_the_batch(folder):
    path = labels(folder, "image,weight,split\n" + "".join(f"img/{i}.png,{i},train\n" for i in range(6)))
    plan = assign_splits(read(folder, path), folder, 0.15, 0.1, 0.15, 0)
    with pytest.raises(DataError, match="0 val images"):
        check_split_sizes(plan.splits, 2, path)
    path = labels(folder, "image,weight\n" + "".join(f"img/{i}.png,{i}\n" for i in range(6)))
    plan = assign_splits(read(folder, path), folder, 0.5, 0.0, 0.0, 0)  # a few val, a few train
    with pytest.raises(DataError, match="fewer than train.batch_size=32"):
        check_split_sizes(plan.splits, 32, path)


def test_training_with_bad_images_errors_or_skips(tmp_path, toy_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    cfg = load_config(config)
    examples = read_labels(data / "labels.csv", data, "image", "weight", None).examples
    plan = assign_splits(examples, data, cfg.data.val_fraction, cfg.data.calibration_fraction, cfg.data.test_fraction, 0)
    # one broken image in each held-out split: each is read once, by validation, calibration and evaluation
    broken = {split: next(e for e, s in zip(examples, plan.splits) if s == split) for split in ("val", "calibration", "test")}
    for kind, example in zip(("truncated_jpeg", "text_named_jpg", "empty"), broken.values()):
        make_broken(kind, example.path)
    result = mdn("train", config)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert broken["val"].image in result.output and "data.on_bad_image: skip" in result.output

    result = mdn("train", config, "--set", "data.on_bad_image=skip", "--overwrite")
    assert result.exit_code == 0, result.output
    skipped = (tmp_path / "runs" / "tiny" / "skipped.txt").read_text()
    assert all(e.image in skipped for e in broken.values())  # every split is read
    assert "skipped 3 unreadable images" in result.output


# --- checkpoints --------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"format_version": 1, "payload": _Exploit(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    result = mdn("predict", tmp_path / "x.png", "--checkpoint", evil)
    assert result.exit_code == 2 and not marker.exists()


def test_broken_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"config": {}, "model_args": {}, "target_scaler": {}, "model": {}}, good)
    cases = {
        "truncated.pt": good.read_bytes()[: len(good.read_bytes()) // 2],
        "random.pt": np.random.default_rng(0).bytes(4096),
        "text.pt": b"hello",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="not a readable mdn checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an mdn checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format_version": 99, "config": {}, "model_args": {}, "target_scaler": {}, "model": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"config": {}, "model_args": {}, "target_scaler": {}, "model": {"w": torch.ones(2)}}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError, match=f"{path}: cannot write \\(No space left on device\\).*intact"):
        save_checkpoint({"config": {}, "model_args": {}, "target_scaler": {}, "model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


# --- runs ----------------------------------------------------------------------------------------


def test_unwritable_out_dir(tmp_path, toy_data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = write_config(tmp_path / "c.yaml", toy_data, blocker / "runs")
    result = mdn("train", config)
    assert result.exit_code == 2 and "cannot create the run folder" in result.output


def test_two_processes_cannot_train_into_one_folder(tmp_path, tiny_config):
    from filelock import FileLock

    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    with FileLock(run / ".lock"):
        result = mdn("train", tiny_config)
    assert result.exit_code == 2 and "another mdn process" in result.output


def test_nan_losses_are_skipped_then_stop_the_run(tiny_config, tmp_path, monkeypatch):
    import mdn_cli.engine as train_module

    real = train_module.mixture_nll
    calls = {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * math.nan if calls["n"] == 2 else loss

    monkeypatch.setattr(train_module, "mixture_nll", sometimes_nan)
    monkeypatch.setattr(Training, "probe", lambda self: None)  # the time estimate's steps would take the NaN
    result = mdn("train", tiny_config, "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert "1 NaN steps skipped" in result.output
    best = torch.load(tmp_path / "runs/tiny/best.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())

    monkeypatch.setattr(train_module, "mixture_nll", lambda *args: real(*args) * math.nan)
    monkeypatch.setattr(train_module, "MAX_BAD_STEPS", 3)
    result = mdn("train", tiny_config, "--overwrite")
    assert result.exit_code == 2
    assert "NaN or infinite in 3 consecutive steps" in result.output and "train.lr" in result.output
