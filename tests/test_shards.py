"""Sharded data (data/shards.py): `mdn shard`, training and scoring from local shards and from a real
S3 server on loopback (moto's server mode, reached through the standard AWS environment
variables), several processes under torchrun, and every bad input in one line."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import train_until, write_config
from typer.testing import CliRunner

from mdn_cli.cli import app

pytest.importorskip("webdataset", reason='sharded data needs its extra: pip install "mdn-cli[shards]"')
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")

HERE = Path(__file__).parent
BUCKET = "mdn-test"


def mdn(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A loopback S3 server; the AWS variables point every client at it (what a user sets for any
    S3-compatible store). Yields its URL."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def config_for(tmp_path: Path, toy_data: Path, name: str, **data) -> Path:
    return write_config(tmp_path / f"{name}.yaml", toy_data, tmp_path / "runs", run={"name": name},
                        data={"num_workers": 2, **data}, train={"epochs": 2, "batch_size": 8})


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, toy_data):
    tmp = tmp_path_factory.mktemp("folder-run")
    assert mdn("train", config_for(tmp, toy_data, "folder")).exit_code == 0
    return tmp / "runs" / "folder"


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory, toy_data) -> Path:
    tmp = tmp_path_factory.mktemp("shards")
    out = tmp / "toy"
    # the folder run's config: the same split rule
    result = mdn("shard", config_for(tmp, toy_data, "shard"), "--output", out, "--images-per-shard", "7")
    assert result.exit_code == 0, result.output
    return out


def test_shards_hold_the_original_bytes_target_key_and_split(local_shards, toy_data, folder_run):
    manifest = json.loads((local_shards / "mdn-shards.json").read_text())
    assert manifest["written_by"] == "mdn-cli" and sum(s["images"] for s in manifest["shards"]) == 60
    index = {r["image"]: r for r in csv.DictReader(open(local_shards / "index.csv"))}
    splits = {r["image"]: r["split"] for r in csv.DictReader(open(folder_run / "splits.csv"))}
    assert {k: r["split"] for k, r in index.items()} == splits  # the split a folder run gives each image
    with tarfile.open(local_shards / manifest["shards"][0]["name"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    record = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
    data = next(v for k, v in members.items() if k.endswith(".bin"))
    assert data == (toy_data / record["image"]).read_bytes()  # never re-encoded
    assert record["split"] == manifest["shards"][0]["split"] and record["target"] == float(index[record["image"]]["target"])


def test_training_from_local_shards_keeps_the_folder_runs_splits_and_evaluates(tmp_path, toy_data, local_shards, folder_run):
    result = mdn("train", config_for(tmp_path, toy_data, "from-shards", shards=str(local_shards)))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "from-shards"
    assert (run / "splits.csv").read_bytes() == (folder_run / "splits.csv").read_bytes()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n"] == sum(1 for r in csv.DictReader(open(run / "splits.csv")) if r["split"] == "test")
    again = mdn("evaluate", "-c", run / "best.pt", "--split", "val", "--output", tmp_path / "val")
    assert again.exit_code == 0, again.output


def test_training_from_s3_keeps_the_folder_runs_splits_and_evaluates(tmp_path, toy_data, folder_run, s3):
    url = f"s3://{BUCKET}/toy"
    written = mdn("shard", config_for(tmp_path, toy_data, "shard"), "--output", url, "--images-per-shard", "9")
    assert written.exit_code == 0, written.output
    cache = tmp_path / "cache"
    result = mdn("train", config_for(tmp_path, toy_data, "from-s3", shards=url, shard_cache_dir=str(cache)))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "from-s3"
    assert (run / "splits.csv").read_bytes() == (folder_run / "splits.csv").read_bytes()
    assert (run / "eval" / "metrics.json").is_file() and list(cache.glob("*.tar"))  # streamed through the cache
    predicted = mdn("predict", "--shards", url, "--split", "test", "-c", run / "best.pt", "-f", "json", "--backend", "torch")
    assert predicted.exit_code == 0, predicted.output
    keys = {r["image"] for r in json.loads(predicted.stdout)}
    assert keys == {r["image"] for r in csv.DictReader(open(run / "splits.csv")) if r["split"] == "test"}


def test_writing_again_after_rows_were_added_writes_only_new_shards(tmp_path, toy_data):
    labels = tmp_path / "labels.csv"
    rows = list(csv.DictReader(open(toy_data / "labels.csv")))
    import shutil

    shutil.copytree(toy_data / "images", tmp_path / "images")

    def write_rows(n):
        with open(labels, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "weight"])
            writer.writeheader()
            writer.writerows(rows[:n])

    out = tmp_path / "shards"
    write_rows(40)
    assert mdn("shard", labels, "-o", out, "--images-per-shard", "5", "--set", "data.target_column=weight").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    index_before = list(csv.DictReader(open(out / "index.csv")))
    write_rows(60)
    result = mdn("shard", labels, "-o", out, "--images-per-shard", "5", "--set", "data.target_column=weight")
    assert result.exit_code == 0 and "of 20 new images" in result.output, result.output
    after = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert all(after[name] == data for name, data in before.items())  # existing shards never change
    assert len(after) > len(before)
    index_after = list(csv.DictReader(open(out / "index.csv")))
    assert index_after[:40] == index_before and len(index_after) == 60  # nor do their splits
    nothing = mdn("shard", labels, "-o", out, "--set", "data.target_column=weight")
    assert "wrote 0 shards of 0 new images" in nothing.output


def test_a_destination_with_files_mdn_did_not_write_is_refused(tmp_path, toy_data):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "photos.tar").write_bytes(b"someone else's")
    result = mdn("shard", toy_data / "labels.csv", "-o", out, "--set", "data.target_column=weight")
    assert result.exit_code == 2 and "holds 1 files mdn did not write" in result.output and "Traceback" not in result.output
    assert (out / "photos.tar").read_bytes() == b"someone else's"


def _copy_shards(local_shards: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(local_shards, out)
    return out


def one_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_missing_shard_ends_in_one_line(tmp_path, toy_data, local_shards):
    shards = _copy_shards(local_shards, tmp_path)
    train_shard = next(p for p in sorted(shards.glob("train-*.tar")))
    train_shard.unlink()
    line = one_line(mdn("train", config_for(tmp_path, toy_data, "missing", shards=str(shards))))
    assert "a shard cannot be read" in line and train_shard.name in line


def test_a_truncated_shard_ends_in_one_line_or_is_skipped_and_logged(tmp_path, toy_data, local_shards):
    shards = _copy_shards(local_shards, tmp_path)
    train_shard = next(p for p in sorted(shards.glob("train-*.tar")))
    train_shard.write_bytes(train_shard.read_bytes()[:3000])
    line = one_line(mdn("train", config_for(tmp_path, toy_data, "truncated", shards=str(shards))))
    assert "a shard cannot be read" in line and "data.on_bad_image: skip" in line
    skipped = mdn("train", config_for(tmp_path, toy_data, "skip", shards=str(shards), on_bad_image="skip"))
    assert skipped.exit_code == 0 and "unreadable images (listed in" in skipped.output, skipped.output
    assert "a shard cannot be read" in (tmp_path / "runs" / "skip" / "skipped.txt").read_text()


def test_a_corrupt_record_is_an_unreadable_image(tmp_path, toy_data, local_shards):
    shards = _copy_shards(local_shards, tmp_path)
    train_shard = next(p for p in sorted(shards.glob("train-*.tar")))
    with tarfile.open(train_shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, (m, data) in enumerate(members):
            data = b"not a png at all" if m.name.endswith(".bin") and i == 0 else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    train_shard.write_bytes(buffer.getvalue())
    line = one_line(mdn("train", config_for(tmp_path, toy_data, "corrupt", shards=str(shards))))
    assert "not an image PIL can read" in line and "data.on_bad_image: skip" in line


def test_an_unreachable_store_and_wrong_credentials_end_in_one_line(tmp_path, toy_data, s3, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    line = one_line(mdn("train", config_for(tmp_path, toy_data, "away", shards=f"s3://{BUCKET}/toy")))
    assert "cannot be reached" in line and "AWS_ENDPOINT_URL" in line
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    import requests

    requests.post(f"{s3}/moto-api/reset-auth", data=b"0")  # from now on the server checks credentials
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
        line = one_line(mdn("train", config_for(tmp_path, toy_data, "denied", shards=f"s3://{BUCKET}/toy")))
        assert "access refused" in line and "AWS_ACCESS_KEY_ID" in line
    finally:
        requests.post(f"{s3}/moto-api/reset-auth", data=b"inf")
    missing = one_line(mdn("train", config_for(tmp_path, toy_data, "none", shards=f"s3://{BUCKET}/nothing-here")))
    assert "no shard set there" in missing


def test_an_interrupted_streaming_run_resumes_to_the_same_state(tmp_path, toy_data, local_shards):
    straight = config_for(tmp_path, toy_data, "straight", shards=str(local_shards))
    stopped = config_for(tmp_path, toy_data, "stopped", shards=str(local_shards))
    assert mdn("train", straight).exit_code == 0
    code, err = train_until(stopped, "train-batch#5")  # in epoch 2, workers streaming
    assert code == 130, err
    assert mdn("train", stopped, "--resume").exit_code == 0
    a = torch.load(tmp_path / "runs/straight/last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/stopped/last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key  # bit for bit on the CPU


def test_two_processes_read_disjoint_shards_and_together_every_image_once(tmp_path, local_shards):
    """Under torchrun each process reads its own shards; uneven shard counts are padded with empty
    batches, so both take the same number of steps."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "shards_worker.py"), str(local_shards), str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    index = list(csv.DictReader(open(local_shards / "index.csv")))
    train = {r["image"] for r in index if r["split"] == "train"}
    for epoch in (0, 1):
        seen = [set(r["keys"][epoch]) for r in ranks]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == train  # exactly once, all of them
        assert sum(len(r["keys"][epoch]) for r in ranks) == len(train)
        assert ranks[0]["steps"][epoch] == ranks[1]["steps"][epoch]
    assert ranks[0]["keys"][0] != ranks[0]["keys"][1]  # a new order each epoch
    shards_per_rank = [set(r["shards"]) for r in ranks]
    assert not shards_per_rank[0] & shards_per_rank[1]


_ = signal  # (SIGINT is what train_until sends)
