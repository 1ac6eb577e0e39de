"""Ctrl-C and SIGTERM at every moment of every long command (interrupts.py).

Each case runs the real `mdn` in its own process, which sends itself the signal when it reaches a
named moment (MDN_TEST_SIGNAL_AT, see interrupts.reached): the moments are chosen by events the
process reports, never by sleeping, so the sweep means the same on a fast and a slow machine.
Every case must end with exit 128 + the signal (130 for SIGINT, 143 for SIGTERM), one line saying
it was interrupted and what was kept, no traceback and no "Exception ignored", no temporary file,
no process left behind; what a stopped `mdn train` left must load and resume.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import pytest
import torch
from conftest import write_config
from mdn_forks import Forks
from typer.testing import CliRunner

from mdn_cli import interrupts
from mdn_cli.checkpoint import load_checkpoint
from mdn_cli.cli import app

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Single-threaded processes, two at a time: the cases are independent and mostly start-up.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Case:
    args: list
    moment: str
    signum: int
    folder: Path
    """Where the case writes (checked for temporary files)."""

    @property
    def label(self) -> str:
        return f"{' '.join(map(str, self.args[:1]))} @ {self.moment} ({signal.Signals(self.signum).name})"


def run(case: Case) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "MDN_TEST_SIGNAL_AT": case.moment, "MDN_TEST_SIGNAL": signal.Signals(case.signum).name}
    return subprocess.run([sys.executable, "-m", "mdn_cli", *map(str, case.args)], capture_output=True, text=True, env=env)


def sweep(cases: list[Case]) -> list[subprocess.CompletedProcess]:
    """Every case, two at a time; through two fork servers (mdn_forks.py) except the moment before
    the imports, which needs a fresh interpreter."""
    servers = Queue()
    for _ in range(2):
        servers.put(Forks(ENV))

    def one(case: Case) -> subprocess.CompletedProcess:
        if case.moment == "start":
            return run(case)
        server = servers.get()
        try:
            env = {"MDN_TEST_SIGNAL_AT": case.moment, "MDN_TEST_SIGNAL": signal.Signals(case.signum).name}
            return server.run(case.args, env, case.folder / "stderr.txt")
        finally:
            servers.put(server)

    try:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(one, cases))
    finally:
        while not servers.empty():
            servers.get().close()


def assert_stopped_cleanly(case: Case, result: subprocess.CompletedProcess) -> str:
    """The common promise; returns the last line of stderr (the message)."""
    err = result.stderr
    assert result.returncode == 128 + case.signum, f"{case.label}: exit {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err and "Exception ignored" not in err, f"{case.label}:\n{err[-3000:]}"
    message = err.strip().splitlines()[-1]
    name = signal.Signals(case.signum).name
    assert message.startswith(f"error: interrupted ({name}); "), f"{case.label}: {message}"
    temporary = [p for p in case.folder.rglob("*.tmp")]
    assert not temporary, f"{case.label}: left {temporary}"
    no_process_left(case, result)
    return message


def no_process_left(case: Case, result: subprocess.CompletedProcess) -> None:
    """The workers were stopped and waited for before the main process exited: nothing is left running
    (a forked case's orphans go to its server, which names them; a fresh process's keep its command line)."""
    left = getattr(result, "left", None)
    if left is None:
        left = subprocess.run(["pgrep", "-f", str(case.folder)], capture_output=True, text=True).stdout.split()
    assert not left, f"{case.label}: processes left running: {left}"


# --- the stop-request machinery, in-process -------------------------------------------------------


def test_a_stop_is_recorded_then_raised_at_the_next_safe_point():
    with interrupts.stop_requests():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here: it only records
        assert interrupts.requested() == signal.SIGTERM
        with pytest.raises(interrupts.Interrupted) as e:
            interrupts.check()
        assert e.value.exit_code == 143 and not e.value.forced
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and interrupts.requested() is None  # all put back


def test_a_second_signal_stops_at_once_but_waits_for_a_held_block():
    written = []
    with interrupts.stop_requests():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(interrupts.Interrupted) as e:
            with interrupts.interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)  # forced, but the block is a group of writes: it finishes first
                written.append("last.pt")
        assert e.value.forced and written == ["last.pt"]
        with pytest.raises(interrupts.Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)  # outside a held block: at once
        assert e.value.forced


def test_collective_mode_defers_to_the_point_every_process_reaches():
    with interrupts.stop_requests(), interrupts.collective():
        os.kill(os.getpid(), signal.SIGINT)
        interrupts.check()  # one process of several must not stop alone
        with pytest.raises(interrupts.Interrupted):
            interrupts.stop_if(True)


def test_a_loader_worker_ignores_stop_signals(toy_data):
    """A terminal sends Ctrl-C to the whole process group; workers must leave the decision to the main process."""
    from mdn_cli.data.dataset import ImageRegressionDataset, make_loader

    class Pids(ImageRegressionDataset):
        def __getitem__(self, key):
            return (torch.zeros(3, 4, 4, dtype=torch.uint8), float(os.getpid()), key, -1)

    loader = make_loader(Pids(sorted((toy_data / "images").glob("*.png"))[:4], [0.0] * 4, 4), 2, 2)
    pids = {int(p) for batch in loader for p in batch.targets.tolist()}
    try:
        for pid in pids:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        assert {int(p) for batch in loader for p in batch.targets.tolist()} == pids  # the same workers, still serving
    finally:
        loader.close()
    for pid in pids:  # stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- mdn train ----------------------------------------------------------------------------------

# (moment, whether last.pt exists once stopped there). 60 toy images: 3 or 4 train batches an epoch.
TRAIN_MOMENTS = [
    ("start", False),                # before anything is imported
    ("labels-read", False),
    ("model-built", False),
    ("train-workers", False),        # inside the first loader worker, while the others are being forked
    ("train-batch#1", False),
    ("train-batch#2", False),
    ("val-workers", False),
    ("val-batch#1", False),          # validation
    ("checkpoint-write#1", True),    # inside torch.save of epoch 1's first file
    ("checkpoint-write#2", True),
    ("epoch-end#1", True),
    ("checkpoint-write#3", True),    # epoch 2's first file
    ("calibration", True),
    ("calibration-batch#1", True),
    ("evaluation-batch#1", True),    # the test split
    ("results-write", True),
]


@pytest.fixture(scope="module")
def train_sweep(tmp_path_factory, toy_data):
    cases = []
    for i, (moment, _) in enumerate(TRAIN_MOMENTS):
        for signum in SIGNALS:
            folder = tmp_path_factory.mktemp(f"train-{i}-{signum}")
            config = write_config(folder / "c.yaml", toy_data, folder / "runs", data={"num_workers": 2},
                                  train={"epochs": 2, "batch_size": 8})
            cases.append(Case(["train", config], moment, signum, folder))
    return cases, sweep(cases)


@pytest.mark.parametrize("moment, saved", TRAIN_MOMENTS, ids=[m for m, _ in TRAIN_MOMENTS])
def test_train_stops_cleanly_at_every_moment(train_sweep, moment, saved):
    for case, result in zip(*train_sweep):
        if case.moment != moment:
            continue
        message = assert_stopped_cleanly(case, result)
        run = case.folder / "runs" / "tiny"
        config = case.args[1]
        if saved:
            assert f"holds the last completed epoch. Continue with: mdn train {config} --resume" in message, message
            ckpt = load_checkpoint(run / "last.pt")
            assert ckpt["epoch"] >= 1 and load_checkpoint(run / "best.pt")["epoch"] >= 1
            lines = (run / "metrics.csv").read_text().strip().splitlines()
            assert len(lines) == ckpt["epoch"] + 1  # the epoch's files were written together
        else:
            assert "nothing to resume. Start again with: mdn train" in message and not (run / "last.pt").exists(), message


def test_what_a_stopped_train_left_resumes(train_sweep):
    """The last good checkpoint loads and resumes to a calibrated, scored model; a run stopped before
    its first epoch starts again. One case per moment (its SIGINT run)."""
    cases = [case for case in train_sweep[0] if case.signum == signal.SIGINT]
    results = sweep([Case(case.args + (["--resume"] if (case.folder / "runs/tiny/last.pt").exists() else []), "none",
                          signal.SIGINT, case.folder) for case in cases])
    for case, result in zip(cases, results):
        assert result.returncode == 0, f"{case.label}: {result.stderr[-2000:]}"
        run = case.folder / "runs" / "tiny"
        assert load_checkpoint(run / "best.pt")["calibration"]["method"] == "conformal", case.label
        assert (run / "eval" / "metrics.json").is_file(), case.label


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_lost(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", data={"num_workers": 2}, train={"epochs": 2, "batch_size": 8})
    result = run(Case(["train", config], "train-batch#1,train-batch#1", signal.SIGINT, tmp_path))  # twice, at the same moment
    err = result.stderr
    assert result.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert "stopped at once (a second SIGINT); no epoch was completed" in err.strip().splitlines()[-1]


def test_a_second_signal_while_an_epoch_is_saved_still_saves_it_whole(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 2, "batch_size": 8})
    result = run(Case(["train", config], "checkpoint-write#1,checkpoint-write#2", signal.SIGTERM, tmp_path))
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "stopped at once (a second SIGTERM); the epoch in progress was not saved;" in message
    run_dir = tmp_path / "runs" / "tiny"
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1 and load_checkpoint(run_dir / "best.pt")["epoch"] == 1
    assert not [p for p in tmp_path.rglob("*.tmp")]


# --- the other long commands --------------------------------------------------------------------


@pytest.fixture(scope="module")
def members(tmp_path_factory, toy_data) -> list[Path]:
    """Two one-epoch members on the same split (and their run folders)."""
    folder = tmp_path_factory.mktemp("members")
    paths = []
    for seed in (0, 1):
        config = write_config(folder / f"m{seed}.yaml", toy_data, folder / "runs", run={"name": f"m{seed}", "seed": seed},
                              train={"epochs": 1, "batch_size": 8, "ood_quantile": 0.8})
        assert CliRunner().invoke(app, ["train", str(config)]).exit_code == 0
        paths.append(folder / "runs" / f"m{seed}" / "best.pt")
    return paths


def cases_for(tmp_path_factory, name: str, moments: list[str], args) -> list[Case]:
    """Both signals at each moment; `args(folder)` gives the command line of a case writing into `folder`."""
    cases = []
    for i, moment in enumerate(moments):
        for signum in SIGNALS:
            folder = tmp_path_factory.mktemp(f"{name}-{i}-{signum}")
            cases.append(Case(args(folder), moment, signum, folder))
    return cases


ENSEMBLE_MOMENTS = ["start", "checkpoint-loaded#1", "checkpoint-write#1", "calibration-batch#1", "calibration-batch#2",
                    "checkpoint-write#2", "evaluation", "results-write"]


def test_ensemble_stops_cleanly_at_every_moment(tmp_path_factory, members):
    cases = cases_for(tmp_path_factory, "ensemble", ENSEMBLE_MOMENTS, lambda f: ["ensemble", *members, "--output", f / "ens", "--device", "cpu"])
    for case, result in zip(cases, sweep(cases)):
        message = assert_stopped_cleanly(case, result)
        best = case.folder / "ens" / "best.pt"
        if case.moment in ("evaluation", "results-write"):
            assert f"the ensemble {best} is complete" in message and load_checkpoint(best)["calibration"]["method"] == "conformal"
        else:  # never an uncalibrated ensemble
            assert "no ensemble was written. Start again with: mdn ensemble" in message and not best.exists(), message


PREDICT_MOMENTS = ["start", "checkpoint-loaded", "predict-workers", "predict-batch#1", "predict-batch#3", "output-write", "plot#1", "plot#2"]


def test_predict_stops_cleanly_at_every_moment(tmp_path_factory, members, toy_data):
    def args(folder):
        return ["predict", toy_data / "images", "-c", members[0], "--backend", "torch", "--batch-size", "8", "--format", "csv",
                "--output", folder / "out.csv", "--plot", folder / "plots"]

    cases = cases_for(tmp_path_factory, "predict", PREDICT_MOMENTS, args)
    for case, result in zip(cases, sweep(cases)):
        message = assert_stopped_cleanly(case, result)
        written = case.moment.startswith(("output-write", "plot"))  # a stop asked for while writing waits for the file
        assert (case.folder / "out.csv").is_file() == written, message
        if written:
            assert len((case.folder / "out.csv").read_text().splitlines()) == 61  # whole: the header and every image
            plots = len(list((case.folder / "plots").glob("*.png")))
            said = f" and {plots} plot{'s' * (plots != 1)} to {case.folder / 'plots'}" if plots else ""
            assert message.endswith(f"wrote 60 predictions to {case.folder / 'out.csv'}{said} before stopping"), message
        else:
            assert message.endswith("nothing was written"), message


def test_predict_on_onnxruntime_stops_cleanly(tmp_path_factory, members, toy_data):
    pytest.importorskip("onnxruntime")
    moments = ["export", "export-verified", "predict-batch#1", "predict-batch#2"]
    cases = cases_for(tmp_path_factory, "predict-onnx", moments, lambda f: ["predict", toy_data / "images", "-c", members[1],
                                                                         "--backend", "onnxruntime", "--batch-size", "16"])
    for case, result in zip(cases, sweep(cases)):
        assert assert_stopped_cleanly(case, result).endswith("nothing was written")


EVALUATE_MOMENTS = ["start", "checkpoint-loaded", "evaluation-batch#1", "results-write"]


def test_evaluate_stops_cleanly_at_every_moment(tmp_path_factory, members, toy_data):
    cases = cases_for(tmp_path_factory, "evaluate", EVALUATE_MOMENTS,
                      lambda f: ["evaluate", "-c", members[0], "--data", toy_data / "labels.csv", "--output", f / "eval"])
    for case, result in zip(cases, sweep(cases)):
        message = assert_stopped_cleanly(case, result)
        assert "files already written are whole; to write them all, run again: mdn evaluate -c" in message
        assert not (case.folder / "eval" / "metrics.json").exists()


EXPORT_MOMENTS = ["start", "checkpoint-loaded", "export", "export-traced", "export-checked", "export-verified"]


def test_export_stops_cleanly_at_every_moment(tmp_path_factory, members):
    pytest.importorskip("onnxruntime")
    cases = cases_for(tmp_path_factory, "export", EXPORT_MOMENTS, lambda f: ["export", members[0], "--output", f / "m.onnx"])
    for case, result in zip(cases, sweep(cases)):
        message = assert_stopped_cleanly(case, result)
        assert f"{case.folder / 'm.onnx'} was not written; run again: mdn export" in message
        assert not (case.folder / "m.onnx").exists()


SERVE_MOMENTS = ["start", "checkpoint-loaded", "model-loaded", "serving", "predict-request"]


def test_serve_stops_cleanly_at_every_moment_and_answers_the_requests_in_flight(tmp_path_factory, members, toy_data):
    pytest.importorskip("fastapi")
    import httpx

    photo = (toy_data / "images" / "00000.png").read_bytes()
    for i, moment in enumerate(SERVE_MOMENTS):
        for signum in SIGNALS:
            folder = tmp_path_factory.mktemp(f"serve-{i}-{signum}")
            case = Case(["serve", members[0], "--port", "0", "--backend", "torch"], moment, signum, folder)
            env = {**os.environ, **ENV, "MDN_TEST_SIGNAL_AT": moment, "MDN_TEST_SIGNAL": signal.Signals(signum).name}
            proc = subprocess.Popen([sys.executable, "-m", "mdn_cli", *map(str, case.args)], stderr=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, text=True, env=env)
            lines: list[str] = []
            answer = None
            for line in proc.stderr:  # events: the server says where it listens
                lines.append(line)
                url = re.search(r" at (http://\S+)  \(Ctrl-C to stop\)", line)
                if url and moment == "predict-request":
                    answer = httpx.post(url.group(1) + "predict", files=[("file", ("a.png", photo, "image/png"))], timeout=None)
            proc.wait()
            result = subprocess.CompletedProcess(case.args, proc.returncode, "", "".join(lines))
            message = assert_stopped_cleanly(case, result)
            if moment == "predict-request":
                assert answer is not None and answer.status_code == 200 and "mean" in answer.json()[0]  # finished, not cut off
                assert "the server stopped after answering the requests in flight" in message


def test_a_server_thread_is_not_affected(tmp_path):
    """stop_requests installs handlers only from the main thread (a server or notebook thread keeps its own)."""
    seen = []

    def work():
        with interrupts.stop_requests():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
