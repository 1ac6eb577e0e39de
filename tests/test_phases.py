"""The time breakdown a run prints (phases.py): phases are timed exclusively and, with start-up and
the time between phases, add up to the whole; a real run prints its breakdown at the end."""

import re

import pytest
from conftest import write_config
from typer.testing import CliRunner

from mdn_cli import phases
from mdn_cli.cli import app


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(phases.time, "perf_counter", c)
    monkeypatch.setattr(phases, "_process_age", lambda: 2.0)
    yield c
    phases.reset()


def test_phases_are_exclusive_and_add_up_to_the_whole(clock):
    phases.reset(from_process_start=True)  # the process started 2 s ago
    clock.now += 1.0  # imports
    with phases.timed("train"):
        clock.now += 5.0
        with phases.timed("validation"):
            clock.now += 2.0
        clock.now += 1.0
    clock.now += 0.5  # between phases
    with phases.timed("train"):
        clock.now += 3.0
    seconds = phases.seconds()
    assert seconds == {"start-up and imports": 3.0, "train": 9.0, "validation": 2.0, "other": 0.5}
    assert sum(seconds.values()) == pytest.approx(phases.elapsed()) == 14.5
    text = phases.breakdown("where the time went")
    assert text.splitlines()[0] == "where the time went (14.5 s in all):"
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["train", "start-up", "validation", "other"]  # largest first


def test_a_run_keeps_the_process_start_once_and_a_second_run_starts_afresh(clock):
    phases.reset(from_process_start=True)
    clock.now += 1.0
    with phases.timed("planning (reading the data)"):
        clock.now += 4.0
    phases.begin_run()  # the `mdn train labels.csv` run: its planning and start-up belong to it
    assert phases.seconds()["planning (reading the data)"] == 4.0 and phases.seconds()["start-up and imports"] == 3.0
    phases.begin_run()  # a second run in the same process (--members)
    assert "planning (reading the data)" not in phases.seconds() and phases.elapsed() == 0.0


def test_a_run_prints_where_its_time_went(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 2})
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    text = result.output[result.output.index("where this run's time went"):]
    total = float(re.search(r"\(([\d.]+) s in all\)", text).group(1))
    rows = dict(re.findall(r"^  (.+?)\s+([\d.]+) s\s+[\d.]+%$", text, re.M))
    timed = phases.seconds()  # the run was in this process
    for phase in ("data and model set-up", "train", "validation", "checkpoints and curves", "calibration", "test evaluation", "plots"):
        assert timed.get(phase, 0) > 0, timed
    assert {k for k, v in timed.items() if v >= 0.05} == set(rows), text  # every phase of 0.1 s or more is printed
    assert sum(float(v) for v in rows.values()) == pytest.approx(total, abs=0.05 * len(rows) + 0.1)
