"""Shared fixtures: tiny generated data sets and configs, never ../shared or the network."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Caches (ONNX exports for onnxruntime, decoded images) go to a folder of this test session, never
# to the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mdn-test-cache-")


def load_script(name: str):
    """Import a file from scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A 60-image toy puppies data set at 32 px (labels.csv, truth.csv, images/)."""
    out = tmp_path_factory.mktemp("toy")
    load_script("make_toy_data").make_toy_dataset(out, n=60, seed=1, size=32)
    return out


def write_config(path: Path, data_root: Path, out_dir: Path, **sections) -> Path:
    """A small, fast CPU config; keyword arguments override whole sections' keys."""
    cfg = {
        "run": {"name": "tiny", "out_dir": str(out_dir), "seed": 0, "device": "cpu"},
        "data": {
            "root": str(data_root),
            "labels": "labels.csv",
            "target_column": "weight",
            "image_size": 32,
            "num_workers": 0,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
        "model": {"backbone": "resnet18", "pretrained": False, "components": 2},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1.0e-3, "early_stopping_patience": None},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_until(config: Path, marker: Path, signum: int = signal.SIGINT, poll: float = 0.05) -> tuple[int, str]:
    """Run `mdn train CONFIG` in a real process, send it `signum` (SIGKILL included) once `marker`
    exists (or at once if the process ends first, or after 300 s); returns its exit code and stderr."""
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: progress bars never fill it and block the run
        proc = subprocess.Popen([sys.executable, "-m", "mdn_cli", "train", str(config)], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(poll)
            proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            proc.kill()  # a no-op once it ended
        stderr.seek(0)
        return proc.returncode, stderr.read()


@pytest.fixture
def tiny_config(tmp_path, toy_data) -> Path:
    return write_config(tmp_path / "config.yaml", toy_data, tmp_path / "runs")


@contextlib.contextmanager
def within(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts a pure-Python loop (the YAML parser is one)."""
    if not hasattr(signal, "setitimer"):  # Windows: no alarm; the test still runs, unbounded
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a test module of many small tensor operations: on a small shared
    machine the intra-op thread barriers cost ~10 ms per op, ten times the op itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
