"""The 30-second version of the serve soak (scripts/soak_serve.py; the 10-minute run's figures are in
the README): normal, bursting, slow, truncated, oversized, non-image and vanishing clients at once,
the server's memory and descriptors watched, overload answered 503 with Retry-After, slow uploads
cut off with 408, and a clean exit on Ctrl-C."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, write_config
from typer.testing import CliRunner

from mdn_cli.cli import app

pytest.importorskip("fastapi", reason='mdn serve needs its extra: pip install "mdn-cli[serve]"')


def test_a_30_second_soak_of_mdn_serve_passes(tmp_path, toy_data):
    config = write_config(tmp_path / "c.yaml", toy_data, tmp_path / "runs", train={"epochs": 1})
    assert CliRunner().invoke(app, ["train", str(config)]).exit_code == 0
    report = tmp_path / "soak.json"
    code = load_script("soak_serve").main([str(tmp_path / "runs" / "tiny" / "best.pt"), str(toy_data / "images"), "--duration", "30",
                                           "--sample", "5", "--warmup", "10", "--json", str(report)])
    result = json.loads(report.read_text())
    assert code == 0, result["failures"]
    answers = result["answers"]
    assert answers["slow"].get("408", 0) >= 1 and answers["oversized"].get("413", 0) >= 1 and answers["normal"]["200"] >= 10
    assert result["server_exit_code"] == 130 and len(result["samples"]) >= 6


def test_the_soak_tells_a_descriptor_leak_from_connections_in_flight(tmp_path):
    """Descriptors that close once the load ends pass; descriptors that stay open are a leak."""
    import os

    soak = load_script("soak_serve")
    start = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    held = [open(tmp_path / f"f{i}", "w") for i in range(20)]  # noqa: SIM115 - held open on purpose
    try:
        assert soak.settled_fds(os.getpid(), start, 8, settle_s=0.2) >= start + 20  # they never close: reported
    finally:
        for f in held:
            f.close()
    assert soak.settled_fds(os.getpid(), start, 8, settle_s=0.2) <= start + 8
    from collections import Counter, defaultdict
    from types import SimpleNamespace

    run = SimpleNamespace(samples=[{"t": 0, "rss_mb": 100.0, "fds": 11}, {"t": 10, "rss_mb": 100.0, "fds": 60}],  # a burst in flight
                          answers=defaultdict(Counter), retry_after_missing=0)
    assert not [f for f in soak.verdict(run, 130, 0, 12, 8) if "descriptors" in f]
    assert [f for f in soak.verdict(run, 130, 0, 40, 8) if "a leak" in f]
