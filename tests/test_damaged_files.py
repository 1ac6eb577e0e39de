"""Damaged model files and full disks: one clear line naming the file, never a traceback, a wrong
answer or a torn file."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_config
from typer.testing import CliRunner

from mdn_cli.checkpoint import load_checkpoint
from mdn_cli.cli import app
from mdn_cli.export import DIGEST_KEY, model_digest

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")

runner = CliRunner()


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, toy_data) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("damaged")
    config = write_config(tmp / "c.yaml", toy_data, tmp / "runs", train={"epochs": 1, "ood_quantile": 0.8})
    assert mdn("train", config).exit_code == 0
    best = tmp / "runs" / "tiny" / "best.pt"
    assert mdn("export", best, "--output", tmp / "model.onnx").exit_code == 0
    return best, tmp / "model.onnx"


def _foreign_model(path: Path, size: int = 48) -> onnx.ModelProto:
    """A valid ONNX file of another network (float input of another size, one output)."""
    torch.onnx.export(torch.nn.Conv2d(3, 2, 3), (torch.zeros(1, 3, size, size),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False)
    return onnx.load(str(path))


def damaged_variants(model_path: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words its error must contain)."""
    data = model_path.read_bytes()
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, content: bytes, words: str) -> None:
        path = folder / f"{name}.onnx"
        path.write_bytes(content)
        out[name] = (path, words)

    put("truncated", data[: len(data) // 2], "")
    put("empty", b"", "empty file")
    for share in (0.1, 0.3, 0.5, 0.7, 0.9, 0.999):  # weights, graph structure, the metadata at the end
        i = int(len(data) * share)
        put(f"flipped-{share}", data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :], "")  # damaged or unreadable, either way named
    foreign = _foreign_model(folder / "foreign.onnx")
    out["another-model"] = (folder / "foreign.onnx", "without mdn's metadata")
    ours = onnx.load(str(model_path))
    foreign.metadata_props.extend(ours.metadata_props)  # mdn's metadata and checksum copied onto another graph
    onnx.save(foreign, str(folder / "disguised.onnx"))
    out["disguised"] = (folder / "disguised.onnx", "damaged")
    # a graph whose metadata was edited (another input size) and its checksum recomputed: consistent, but lying
    props = {p.key: p for p in ours.metadata_props}
    meta = json.loads(props["mdn"].value)
    meta["input"]["size"] += 16
    props["mdn"].value = json.dumps(meta)
    props[DIGEST_KEY].value = model_digest(ours)
    onnx.save(ours, str(folder / "resized.onnx"))
    out["other-input-size"] = (folder / "resized.onnx", "does not match its metadata")
    return out


@pytest.fixture(scope="module")
def variants(exported, tmp_path_factory):
    return damaged_variants(exported[1], tmp_path_factory.mktemp("variants"))


def test_the_intact_export_still_loads(exported, toy_data):
    result = mdn("predict", toy_data / "images" / "00000.png", "-c", exported[1], "-f", "json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_damaged_model_files_end_in_one_line_naming_them(variants, toy_data, command):
    for name, (path, words) in variants.items():
        if command == "predict":
            result = mdn("predict", toy_data / "images" / "00000.png", "-c", path)
        else:
            result = mdn("evaluate", "-c", path, "--data", toy_data / "labels.csv", "--output", path.parent / f"eval-{name}")
        line = one_line_error(result)
        assert str(path) in line and words in line, f"{name}: {line}"
        assert any(w in line for w in ("damaged", "not a readable", "another model", "does not match", "empty file")), f"{name}: {line}"


def test_evaluate_refuses_an_intact_export_and_says_what_to_give(exported, toy_data):
    line = one_line_error(mdn("evaluate", "-c", exported[1], "--data", toy_data / "labels.csv"))
    assert "an exported model; mdn evaluate scores the checkpoint it was exported from" in line


def test_serve_refuses_damaged_model_files_before_serving(variants):
    pytest.importorskip("fastapi")
    # Were a damaged file ever served, the server would stop itself on reaching `serving` (exit 130) instead of hanging.
    env = {**os.environ, "MDN_TEST_SIGNAL_AT": "serving", "OMP_NUM_THREADS": "1"}
    for name, (path, words) in variants.items():
        result = subprocess.run([sys.executable, "-m", "mdn_cli", "serve", str(path), "--port", "0"], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, f"{name}: {result.stderr[-2000:]}"
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and str(path) in line and words in line, f"{name}: {line}"


# --- full disks ---------------------------------------------------------------------------------


def limited(max_bytes: int):
    """preexec_fn: files of this process may not grow beyond `max_bytes` (a full disk, as a write sees it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def run_limited(args: list, max_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mdn_cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limited(max_bytes), env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_full_disk_during_a_checkpoint_write_names_the_file_and_keeps_the_previous_epoch(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 1, "batch_size": 8})
    assert mdn("train", config).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.csv")}
    limit = (run / "best.pt").stat().st_size + 1024  # best.pt fits, last.pt (with the optimiser's state) does not
    result = run_limited(["train", config, "--resume", "--set", "train.epochs=3"], limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {run / 'last.pt'}: cannot write (File too large)"), line
    assert "the previous last.pt, if there was one, is intact" in line
    assert (run / "last.pt").read_bytes() == before["last.pt"] and (run / "metrics.csv").read_bytes() == before["metrics.csv"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] >= 1
    assert not list(run.glob(".*.tmp"))
    result = subprocess.run([sys.executable, "-m", "mdn_cli", "train", str(config), "--resume", "--set", "train.epochs=2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]  # and with room again, the run goes on


def test_a_full_disk_while_writing_results_names_the_file_and_leaves_no_partial_file(exported, toy_data, tmp_path):
    best, _ = exported
    out = tmp_path / "eval"
    result = run_limited(["evaluate", "-c", best, "--data", toy_data / "labels.csv", "--output", out], 2000)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {out / 'metrics.json'}: cannot write (File too large)"), line
    assert not (out / "metrics.json").exists() and not list(out.glob(".*.tmp"))
    csv = tmp_path / "preds.csv"
    result = run_limited(["predict", toy_data / "images", "-c", best, "--backend", "torch", "-f", "csv", "-o", csv, "--batch-size", "64"],
                         2000)  # one batch: no loader workers (see the next test)
    assert result.returncode == 2 and f"error: {csv}: cannot write (File too large)" in result.stderr, result.stderr[-3000:]
    assert not csv.exists() and not list(tmp_path.glob(".*.tmp"))


def test_loader_workers_that_cannot_hand_over_a_batch_end_in_one_line_not_a_hang(exported, toy_data, tmp_path):
    """Workers hand batches over through shared memory files; when those cannot grow (a full /dev/shm,
    here a file-size limit), Python's queue used to drop the batch and both sides waited for ever."""
    best, _ = exported
    result = run_limited(["predict", toy_data / "images", "-c", best, "--backend", "torch", "--batch-size", "8"], 2000)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: an image loader process stopped") and "data.num_workers: 0" in line, line
