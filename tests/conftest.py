"""Shared fixtures: tiny generated data sets and configs, never ../shared or the network."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Caches (ONNX exports for onnxruntime, decoded images) go to a folder of this test session, never
# to the user's home, and go with the test process.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mdn-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# A test process that a shell without job control started in the background (`cmd &` in a script)
# begins with SIGINT ignored, and Python leaves it so; these tests check mdn as a terminal runs it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Under pytest-xdist (scripts/test.sh runs one test process per core) each process and every `mdn`
# it starts computes on one thread: two processes with a thread per core each would spin-wait on
# each other's OpenMP barriers, several times slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found():
    """Every test (and the mdn code it runs in this process) leaves Ctrl-C and SIGTERM as it found
    them: a library call that left SIGINT ignored would leave a notebook deaf to Ctrl-C, and the
    next test of this process with it."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {s: signal.getsignal(s) for s in before}
    for s, handler in before.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)
    assert after == before, f"signal handlers changed by this test: {before} -> {after}"


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


def run_until(args: list, moment: str, signum: int = signal.SIGINT, env: dict | None = None) -> tuple[int, str]:
    """Run `mdn ARGS` in a real process that sends itself `signum` (SIGKILL included) when it reaches
    `moment` (`interrupts.reached`: a name, `name#n` for its n-th time, or several, comma-separated):
    the signal lands exactly there, however fast or busy the machine. Returns the exit code and stderr."""
    signal_env = {"MDN_TEST_SIGNAL_AT": moment, "MDN_TEST_SIGNAL": signal.Signals(signum).name.removeprefix("SIG")}
    result = subprocess.run([sys.executable, "-m", "mdn_cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {}), **signal_env})
    return result.returncode, result.stderr


def train_until(config: Path, moment: str, signum: int = signal.SIGINT) -> tuple[int, str]:
    """`mdn train CONFIG`, signalled at `moment` (see run_until)."""
    return run_until(["train", config], moment, signum)


@pytest.fixture
def tiny_config(tmp_path, toy_data) -> Path:
    return write_config(tmp_path / "config.yaml", toy_data, tmp_path / "runs")


# The hang guard's limit. It is not a performance budget: the operations it guards take
# milliseconds, so only a true hang (an endless loop on hostile input) can reach it, however slow
# or loaded the machine.
HANG_S = 600


@contextlib.contextmanager
def within(seconds: float = HANG_S):
    """A hang guard: fail instead of hanging forever. SIGALRM interrupts a pure-Python loop (the YAML
    parser is one) once `seconds` (HANG_S: orders of magnitude above the guarded work's real cost)
    have gone by, so it fires on a true hang and never on a merely slow machine. Callers pass no
    argument."""
    if not hasattr(signal, "setitimer"):  # Windows: no alarm; the test still runs, unbounded
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

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
