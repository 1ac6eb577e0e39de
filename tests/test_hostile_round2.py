"""Reliability, round 2: no lost files, no silent non-training, no hangs, no tracebacks.

Each class of hostile input found by an independent run, with several instances each. The labels
file and the YAML config have their own files (test_labels.py, test_config_hostile.py and the
property-based test_config_fuzz.py / test_labels.py)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import train_until, write_config
from typer.testing import CliRunner

from mdn_cli.cli import app

runner = CliRunner()


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_data):
    tmp = tmp_path_factory.mktemp("round2")
    config = write_config(tmp / "c.yaml", toy_data, tmp / "runs", train={"epochs": 1, "batch_size": 8})
    assert mdn("train", config).exit_code == 0
    return tmp / "runs" / "tiny" / "best.pt"


# --- 1. data loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "a/b", ".hidden", "-rf", "x" * 101])
def test_a_run_name_is_one_plain_folder_name_and_nothing_is_deleted(tmp_path, toy_data, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("mine")
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    output = one_line_error(mdn("train", config, "--set", f"run.name={name}", "--overwrite"))
    assert "run.name" in output
    assert (tmp_path / "config.yaml").read_text() == "mine" and (tmp_path / "eval" / "notes.txt").read_text() == "mine"


def test_overwrite_removes_only_what_mdn_wrote_and_says_which(tiny_config, tmp_path):
    assert mdn("train", tiny_config, "--set", "train.epochs=1").exit_code == 0
    run = tmp_path / "runs" / "tiny"
    (run / "my_notes.md").write_text("mine")
    (run / "photos").mkdir()
    result = mdn("train", tiny_config, "--set", "train.epochs=1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "--overwrite: removed" in result.output and "last.pt" in result.output and "my_notes" not in result.output
    assert (run / "my_notes.md").read_text() == "mine" and (run / "photos").is_dir()


# --- 4. hangs ------------------------------------------------------------------------------------


def test_special_files_given_to_predict_never_hang(trained, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)

    # No timing: a writer waits at the FIFO. Were predict ever to open it, it would get a few bytes
    # and an end of file (and fail to decode them) instead of blocking forever in the read.
    def write_a_few_bytes():
        with open(fifo, "wb") as f:  # blocks until someone opens the FIFO for reading
            f.write(b"not an image")

    writer = threading.Thread(target=write_a_few_bytes, daemon=True)
    writer.start()
    proc = subprocess.run([sys.executable, "-m", "mdn_cli", "predict", str(fifo), "/dev/zero", str(loop), "-c", str(trained)],
                          capture_output=True, text=True)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer through if predict did not
    writer.join()
    os.close(reader)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert "pipe.jpg: is not a regular file" in proc.stderr and "/dev/zero" in proc.stderr
    result = mdn("predict", folder, "-c", trained)
    assert "folder holds no images" in one_line_error(result)


# --- 5. tracebacks -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "directory"])
def test_predict_when_every_input_is_unreadable(trained, tmp_path, kind):
    bad = [tmp_path / f"{kind}{i}.png" for i in range(3)]
    for path in bad:
        if kind == "directory":
            path.mkdir()
            (path / "inner.txt").write_text("x")
        else:
            path.write_bytes({"text": b"hello", "empty": b"", "truncated": b"\x89PNG\r\n\x1a\n\x00\x00"}[kind])
    output = one_line_error(mdn("predict", *bad, "-c", trained, "-f", "json"), code=1 if kind != "directory" else 2)
    assert "predicted" in output or "no images" in output or "holds no images" in output


def test_every_val_image_unreadable_under_skip(tmp_path, toy_data):
    from mdn_cli.config import load_config
    from mdn_cli.data.labels import read_labels
    from mdn_cli.data.splits import assign_splits

    data = Path(shutil.copytree(toy_data, tmp_path / "data"))
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"on_bad_image": "skip"},
                          train={"epochs": 1, "batch_size": 8})
    d = load_config(config).data
    examples = read_labels(data / "labels.csv", data, "image", "weight", None).examples
    plan = assign_splits(examples, data, d.val_fraction, d.calibration_fraction, d.test_fraction, d.split_seed)
    for e, s in zip(examples, plan.splits):
        if s == "val":
            e.path.write_bytes(b"broken")
    output = one_line_error(mdn("train", config))
    assert "no val image could be read" in output


@pytest.mark.parametrize("backbone, size", [("convnext_tiny", 16), ("convnext_tiny", 24)])
def test_an_image_size_too_small_for_the_backbone_is_refused_before_anything_is_written(tmp_path, toy_data, backbone, size):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", model={"backbone": backbone, "pretrained": False})
    output = one_line_error(mdn("train", config, "--set", f"data.image_size={size}"))
    assert f"{size} px is too small for {backbone}" in output and "32 or more" in output
    assert not (tmp_path / "runs" / "tiny" / "config.yaml").exists()


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_cache_dir_that_is_not_a_writable_folder(tiny_config, tmp_path, where):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "cache"
    output = one_line_error(mdn("train", tiny_config, "--set", "data.cache=disk", "--set", f"data.cache_dir={target}"))
    assert "data.cache_dir" in output and "not a writable folder" in output


def test_plot_pointing_at_a_file(trained, toy_data, tmp_path):
    (tmp_path / "plots").write_text("a file")
    output = one_line_error(mdn("predict", toy_data / "images" / "00000.png", "-c", trained, "--plot", tmp_path / "plots"))
    assert "--plot" in output and "is a file" in output


# --- 6. misleading messages -----------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["resnet19", "timm/not_a_model", "efficientnet"])
def test_unknown_backbones_are_found_before_files_are_written(tmp_path, toy_data, backbone):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", model={"backbone": backbone, "pretrained": False})
    output = one_line_error(mdn("train", config))
    assert "model.backbone" in output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


@pytest.mark.parametrize("content", ["module", "optimizer", "text"])
def test_pretrained_files_that_are_not_weights_never_advise_weights_only_false(tmp_path, toy_data, content):
    path = tmp_path / "weights.pth"
    if content == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif content == "optimizer":
        torch.save(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), path)
    else:
        path.write_text("not weights")
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", model={"backbone": "resnet18", "pretrained": str(path)})
    output = one_line_error(mdn("train", config))
    assert "model.pretrained" in output and "weights_only" not in output and "state_dict()" in output
    assert not (tmp_path / "runs" / "tiny" / "config.yaml").exists()  # nothing written for a start that cannot train


def test_ctrl_c_before_the_first_epoch_says_start_again(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 3, "batch_size": 8})
    returncode, err = train_until(config, "train-batch#1")
    assert not (tmp_path / "runs" / "tiny" / "last.pt").exists()
    assert returncode == 130 and "nothing to resume" in err and "--resume" not in err.split("Start again")[-1]
    assert mdn("train", config, "--set", "train.epochs=1").exit_code == 0  # and starting again just works


def test_ctrl_c_inside_a_block_of_writes_is_delivered_after_it():
    """mdn used as a library (no stop_requests): a held block delivers the signal when it ends."""
    from mdn_cli.interrupts import interrupts_held

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)  # the handler would run at once here, were the signal not held
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in force before is back


def test_sigterm_and_ctrl_c_both_held_are_both_delivered():
    from mdn_cli.interrupts import interrupts_held

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("TERM"))
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                assert seen == []  # held
        assert seen == ["TERM"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_while_an_epoch_is_saved_keeps_the_whole_epoch(tmp_path, toy_data, monkeypatch):
    """Ctrl-C during torch.save used to tear the write (a RuntimeError traceback from the zip
    writer, exit 1) or lose the epoch; now the epoch's files are finished, then the run stops."""
    import mdn_cli.checkpoint

    real_save = torch.save

    def save_then_interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the checkpoint is being written
        real_save(obj, f)

    monkeypatch.setattr(mdn_cli.checkpoint.torch, "save", save_then_interrupted)
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 3, "batch_size": 8})
    output = one_line_error(mdn("train", config), code=130)
    run = tmp_path / "runs" / "tiny"
    assert "holds the last completed epoch" in output and "--resume" in output
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1 and (run / "best.pt").is_file()
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # the header and epoch 1
    assert not list(run.glob(".*.tmp"))


# --- 7. untrusted numbers in files ---------------------------------------------------------------


def _damaged(trained, tmp_path, change) -> Path:
    ckpt = torch.load(trained, weights_only=True)
    change(ckpt)
    path = tmp_path / "damaged" / "best.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda c: c["target_scaler"].update(scale=-1.0), "impossible target scaling"),
    (lambda c: c["target_scaler"].update(loc=float("nan")), "impossible target scaling"),
    (lambda c: c["model_args"].update(image_size=4), "impossible model arguments"),
    (lambda c: c["model"].update({k: v * float("nan") for k, v in list(c["model"].items())[:1]}), "non-finite weights"),
    (lambda c: c["calibration"]["scale"].update(coef=[float("nan")]), "std-scale coefficients"),
    (lambda c: c["calibration"]["scores"].update(pit=torch.tensor([0.9, 0.2])), "sorted"),
    (lambda c: c["calibration"].update(method="magic"), "unknown calibration method"),
    (lambda c: c.update(unfamiliar={"threshold": -1.0, "quantile": 0.99, "n_images": 10}), "threshold"),
])
def test_checkpoints_with_impossible_values_are_refused(trained, toy_data, tmp_path, change, words):
    path = _damaged(trained, tmp_path, change)
    for backend in ("torch", "auto"):
        output = one_line_error(mdn("predict", toy_data / "images" / "00000.png", "-c", path, "--backend", backend))
        assert "damaged" in output and words in output


def test_predicting_with_an_uncalibrated_last_pt_says_so(trained, toy_data):
    result = mdn("predict", toy_data / "images" / "00000.png", "-c", trained.parent / "last.pt")
    assert result.exit_code == 0 and "is not calibrated" in result.stderr
    assert "is not calibrated" not in mdn("predict", toy_data / "images" / "00000.png", "-c", trained).stderr


# --- 8. signals ----------------------------------------------------------------------------------


def test_sigterm_stops_like_ctrl_c_leaving_no_temp_files_or_workers(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", data={"num_workers": 2},
                          train={"epochs": 50, "batch_size": 8})
    run = tmp_path / "runs" / "tiny"
    returncode, err = train_until(config, "epoch-end#1", signal.SIGTERM)  # what schedulers and `docker stop` send
    assert returncode == 143 and "interrupted (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))
    left = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"  # the loader workers were stopped and waited for before it exited
    assert mdn("train", config, "--resume", "--set", "train.epochs=2").exit_code == 0
