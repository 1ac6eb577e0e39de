#!/usr/bin/env python
"""Compare WebDataset, litdata and MosaicML Streaming for mdn's sharded data, by measurement.

    bash scripts/compare_shard_libraries.sh data/toy/labels.csv            # builds .venv-shards, then runs this
    python scripts/compare_shard_libraries.py LABELS.csv [--limit N] [--json out.json]

For each library, on the same images (the labels file's rows, original bytes, target, key and
split in every record):
    write       seconds to write the shards, and their size
    local       reading one whole epoch from local disk through a DataLoader (2 workers, batches of
                32, every image decoded and resized to 64 px as mdn does): start-up (to the first
                batch) and images/s after it
    s3          the same from a loopback S3 server (moto's server mode), through the library's own
                caching; a fresh cache each time
    resume      whether a loader stopped after 5 batches and restored from its state gives exactly
                the batches an uninterrupted one gives next
    torchrun    2 processes (torchrun, gloo) over an epoch: each image seen exactly once in all, and
                whether both ranks get the same number of batches (DDP needs it)
Run it in a virtual environment that has all three (scripts/compare_shard_libraries.sh makes one:
MosaicML Streaming pins numpy < 2.2, which mdn's own environment does not). Times are wall-clock
on this machine, measured one library at a time.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, WORKERS, SIDE, RESUME_AFTER = 32, 2, 64, 5
BUCKET = "mdn-bench"


def records(labels: Path, limit: int | None) -> list[dict]:
    rows = list(csv.DictReader(open(labels, newline="", encoding="utf-8")))[:limit]
    target = [c for c in rows[0] if c not in ("image", "split")][0]
    out = []
    for i, r in enumerate(rows):
        data = (labels.parent / r["image"]).read_bytes()
        out.append({"key": f"{i:08d}", "image": r["image"], "bytes": data, "target": float(r[target]), "split": r.get("split") or "train"})
    return out


def decode(data: bytes):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (SIDE, SIDE))
        im = im.convert("RGB").resize((SIDE, SIDE))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def collate(items):
    import torch

    return torch.stack([i[0] for i in items]), [i[1] for i in items]


# --- the three libraries: write, and a dataset yielding (image tensor, key) ------------------------

# Datasets decoding each item, at module level: litdata and Streaming start their loader workers by
# spawning, which unpickles the dataset in a fresh interpreter that re-imports this file.
try:
    import litdata
    from streaming import StreamingDataset
    from litdata.streaming import downloader as litdata_downloader

    # litdata's fast download path (obstore) refuses plain HTTP, which the loopback store speaks;
    # an S3 store over HTTPS needs nothing of this.
    litdata_downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True

    class LitDecoded(litdata.StreamingDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            return decode(item["image"]), item["key"]

    class StreamingDecoded(StreamingDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            return decode(item["image"]), item["key"]
except ImportError:  # outside .venv-shards: the comparison cannot run, the module still imports
    pass



class WebDataset:
    name = "webdataset"

    def write(self, recs: list[dict], out: Path, per_shard: int) -> None:
        import webdataset as wds

        out.mkdir(parents=True)
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for r in recs:
                sink.write({"__key__": r["key"], "img": r["bytes"],
                            "json": json.dumps({"image": r["image"], "target": r["target"], "split": r["split"]}).encode()})

    def dataset(self, where: str, cache: Path, seed: int = 0, shuffle: bool = True):
        import fsspec
        import webdataset as wds

        fs, _, paths = fsspec.get_fs_token_paths(where.rstrip("/") + "/shard-*.tar")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        urls = sorted(p if p.startswith("/") else f"{protocol}://{p}" for p in paths)
        wds.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
        if where.startswith("s3"):
            cache.mkdir(parents=True, exist_ok=True)
        ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, cache_dir=str(cache) if where.startswith("s3") else None,
                            empty_check=False)
        if shuffle:
            ds = ds.shuffle(500, rng=__import__("random").Random(seed))
        return ds.map(lambda s: (decode(s["img"]), s["__key__"]))

    def loader(self, ds):
        import torch

        return torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=collate)

    resume = None  # no loader state: an epoch's order is a function of its seed, so a run can only restart an epoch


def litdata_record(r: dict) -> dict:
    """One litdata item (module level: litdata's writer processes are spawned and unpickle it)."""
    return {"key": r["key"], "image": r["bytes"], "target": r["target"], "split": r["split"]}


class LitData:
    name = "litdata"

    def write(self, recs: list[dict], out: Path, per_shard: int) -> None:
        import litdata

        litdata.optimize(fn=litdata_record, inputs=recs, output_dir=str(out), chunk_size=per_shard, num_workers=1, verbose=False)

    def dataset(self, where: str, cache: Path, seed: int = 0, shuffle: bool = True):
        return LitDecoded(where if where.startswith("s3") else f"local:{where}", cache_dir=str(cache), shuffle=shuffle, seed=seed,
                       max_cache_size="2GB", storage_options={"endpoint_url": os.environ.get("AWS_ENDPOINT_URL")}
                       if where.startswith("s3") else None)

    def loader(self, ds):
        import litdata

        return litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=collate)

    resume = "state_dict"


class Streaming:
    name = "mosaicml-streaming"

    def write(self, recs: list[dict], out: Path, per_shard: int) -> None:
        from streaming import MDSWriter

        size = max(len(r["bytes"]) for r in recs) * per_shard
        with MDSWriter(out=str(out), columns={"key": "str", "image": "bytes", "target": "float64", "split": "str"},
                       size_limit=size) as writer:
            for r in recs:
                writer.write({"key": r["key"], "image": r["bytes"], "target": r["target"], "split": r["split"]})

    def dataset(self, where: str, cache: Path, seed: int = 0, shuffle: bool = True):
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()

        remote = where if where.startswith("s3") else None
        return StreamingDecoded(remote=remote, local=str(cache) if remote else where, shuffle=shuffle, shuffle_seed=seed, batch_size=BATCH,
                       cache_limit="2gb" if remote else None)

    def loader(self, ds):
        from streaming import StreamingDataLoader

        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=collate)

    resume = "state_dict"


LIBRARIES = {lib.name: lib for lib in (WebDataset(), LitData(), Streaming())}


# --- measuring -----------------------------------------------------------------------------------


def epoch(lib, where: str, cache: Path) -> dict:
    started = time.perf_counter()
    loader = lib.loader(lib.dataset(where, cache))
    first, keys = None, []
    for images, batch_keys in loader:
        if first is None:
            first = time.perf_counter()
        keys += batch_keys
    done = time.perf_counter()
    return {"startup_s": round(first - started, 2), "images_per_s": round((len(keys) - BATCH) / max(done - first, 1e-9), 1),
            "images": len(keys), "distinct": len(set(keys))}


def resume_exact(lib, where: str, cache: Path) -> bool | str:
    if lib.resume is None:
        return "no (no loader state; an epoch restarts from its start)"
    straight = [keys for _, keys in lib.loader(lib.dataset(where, cache / "a"))]
    loader = lib.loader(lib.dataset(where, cache / "b"))
    for i, _ in enumerate(loader):
        if i + 1 == RESUME_AFTER:
            state = loader.state_dict()
            break
    restored = lib.loader(lib.dataset(where, cache / "c"))
    restored.load_state_dict(state)
    rest = [keys for _, keys in restored]
    return rest == straight[RESUME_AFTER:]


def torchrun(lib_name: str, where: str, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--rank-keys", lib_name, where,
               str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys = [set(k for batch in r for k in batch) for r in per_rank]
    return {"batches_per_rank": [len(r) for r in per_rank], "images_per_rank": [sum(len(b) for b in r) for r in per_rank],
            "overlap": len(keys[0] & keys[1]), "union": len(keys[0] | keys[1])}


def rank_keys(lib_name: str, where: str, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    lib = LIBRARIES[lib_name]
    rank = dist.get_rank()
    keys = [list(batch) for _, batch in lib.loader(lib.dataset(where, out / f"cache{rank}", shuffle=False))]
    (out / f"rank{rank}.json").write_text(json.dumps(keys))
    dist.destroy_process_group()


def s3_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def upload(local: Path, prefix: str) -> str:
    import boto3

    client = boto3.client("s3")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--rank-keys":
        rank_keys(argv[1], argv[2], Path(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", type=Path)
    parser.add_argument("--limit", type=int, help="Only the first N rows.")
    parser.add_argument("--per-shard", type=int, default=300, help="Images per shard (default 300: uneven counts over 2 ranks).")
    parser.add_argument("--only", nargs="*", default=list(LIBRARIES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    recs = records(args.labels, args.limit)
    server = s3_server()
    results = {}
    work = Path(tempfile.mkdtemp(prefix="shardbench-"))
    try:
        for name in args.only:
            lib = LIBRARIES[name]
            out = work / name
            started = time.perf_counter()
            lib.write(recs, out / "shards", args.per_shard)
            r = {"write_s": round(time.perf_counter() - started, 2),
                 "size_mb": round(sum(p.stat().st_size for p in (out / "shards").rglob("*") if p.is_file()) / 1e6, 1)}
            r["local"] = epoch(lib, str(out / "shards"), out / "cache-local")
            url = upload(out / "shards", name)
            r["s3"] = epoch(lib, url, out / "cache-s3")
            try:
                r["resume_exact"] = resume_exact(lib, str(out / "shards"), out / "resume")
            except Exception as e:  # noqa: BLE001 - a library without the feature, or broken for it: report it
                r["resume_exact"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            try:
                (out / "ranks").mkdir()
                r["torchrun"] = torchrun(name, str(out / "shards"), out / "ranks")
            except subprocess.CalledProcessError as e:
                r["torchrun"] = f"failed: {e.stderr.strip().splitlines()[-1][:200] if e.stderr else e}"
            results[name] = r
            print(json.dumps({name: r}), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| library | write s (MB) | local: start-up s, images/s | loopback S3: start-up s, images/s | exact resume | "
          f"torchrun (2 ranks): batches per rank, overlap, union of {len(recs)} |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["torchrun"]
        tr = t if isinstance(t, str) else f"{t['batches_per_rank']}, {t['overlap']}, {t['union']}"
        print(f"| {name} | {r['write_s']} ({r['size_mb']}) | {r['local']['startup_s']}, {r['local']['images_per_s']} | "
              f"{r['s3']['startup_s']}, {r['s3']['images_per_s']} | {r['resume_exact']} | {tr} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
