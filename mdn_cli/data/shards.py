"""The shard source: a labelled image set as WebDataset tar shards, on local disk or in an object store.

A shard set (a folder, or a URL prefix such as s3://bucket/photos):
    mdn-shards.json   what the set is: written by mdn, the target column, the split rule, and every
                      shard (name, split, images)
    index.csv         one row per image: image (its key: the path it had in the labels file),
                      target, split, group, shard
    SPLIT-NNNNNN.tar  the records, one split per shard: per image a `bin` member (the original
                      file's bytes, never re-encoded) and a `json` member (image, target, split, group)
Writing (`write_shards`) splits by the rule a folder run uses (splits.assign_splits), so a shard
run and a folder run of the same images have identical splits. Written again after rows were
added, it writes shards of the new images only; existing shards never change. It refuses a
destination holding files it did not write.
Reading (`ShardSource`, `data.shards`): fsspec opens every URL (local paths, file://, s3:// with
the standard AWS environment variables -- AWS_ENDPOINT_URL for any S3-compatible store --, and
whatever else fsspec knows); WebDataset reads the tars, downloading remote ones into its file
cache (data.shard_cache_dir, capped at data.shard_cache_gb) and mixing records in a shuffle buffer
(data.shuffle_buffer). An epoch's order depends only on (run.seed, epoch): the shard order, the
shuffle buffer and each image's augmentation seed (the one a folder run gives it), so a resumed
run repeats an interrupted epoch exactly. Under torchrun each process reads its own shards (round
robin over the epoch's order) and pads with empty batches to the same number of steps: together
they see every image of the split exactly once per epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from .. import interrupts
from ..errors import DataError
from ..images import UnreadableImageError, decode_square
from .cache import DecodedCache
from .dataset import Augment, Batch, Loader, augment_image, collate, worker_init
from .labels import SPLITS, Example, Labels
from .splits import assign_splits

MANIFEST = "mdn-shards.json"
INDEX = "index.csv"
FORMAT = 1
SHARD_NAME = re.compile(r"^(train|val|calibration|test|unassigned)-(\d{6})\.tar$")
HELP = 'sharded data needs the shards extra: pip install "mdn-cli[shards]"'


def _fs(url: str):
    """(fsspec filesystem, path inside it) of a URL or local path; a clear error for the unknown."""
    try:
        import fsspec
    except ImportError:
        raise DataError(HELP) from None
    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=True)  # the environment (AWS_*) as it is now
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing (s3fs for s3://)
        raise DataError(f"{url}: cannot open this kind of address ({e}); for s3:// install s3fs (pip install \"mdn-cli[shards]\")") \
            from None


def storage_error(url: str, e: BaseException) -> DataError:
    """One line for a store that cannot be reached, refuses the credentials, or has no such object."""
    text = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if isinstance(e, FileNotFoundError):
        return DataError(f"{url}: not found ({text})")
    if isinstance(e, PermissionError) or any(w in text for w in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                                "Forbidden", "NoCredentials", "credentials")):
        return DataError(f"{url}: access refused ({text}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_PROFILE)")
    return DataError(f"{url}: cannot be reached ({text}); check the address and, for an S3-compatible store, AWS_ENDPOINT_URL")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


@dataclass
class Manifest:
    target_column: str
    group_column: str | None
    split_rule: dict
    shards: list[dict]
    """Every shard: name, split, images."""

    def state(self) -> dict:
        return {"format": FORMAT, "written_by": "mdn-cli", "target_column": self.target_column, "group_column": self.group_column,
                "split_rule": self.split_rule, "shards": self.shards}

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        try:
            state = json.loads(text)
            if state.get("written_by") != "mdn-cli" or state.get("format") != FORMAT:
                raise ValueError("not written by this mdn")
            return cls(state["target_column"], state.get("group_column"), dict(state["split_rule"]), list(state["shards"]))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: not a shard set mdn wrote ({e}); write one with mdn shard") from None


# --- writing ----------------------------------------------------------------------------------------


def write_shards(source, data: dict, out: str, per_shard: int, log: Callable[[str], None] = print) -> dict:
    """Write (or extend) the shard set at `out` from a folder source; returns what was written."""
    try:
        import webdataset as wds
    except ImportError:
        raise DataError(HELP) from None
    fs, base = _fs(out)
    labels = source.read()
    rule = {k: data[k] for k in ("val_fraction", "calibration_fraction", "test_fraction", "split_seed")}
    rule["split_column"] = data.get("split_column")
    try:
        exists = fs.exists(_join(base, MANIFEST))
        listed = fs.ls(base, detail=False) if fs.exists(base) else []
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            fs.makedirs(base, exist_ok=True)  # object stores have no folders to make
    except Exception as e:  # noqa: BLE001 - every store fails its own way: name it in one line
        raise storage_error(out, e) from None
    if exists:
        manifest = Manifest.parse(fs.cat_file(_join(base, MANIFEST)).decode(), out)
        if (manifest.target_column, manifest.split_rule) != (data["target_column"], rule):
            raise DataError(f"{out}: its shards were written with another target column or split rule "
                            f"({manifest.target_column}, {manifest.split_rule}); write a new shard set elsewhere")
        index = _read_index(fs.cat_file(_join(base, INDEX)).decode(), out)
    else:
        foreign = [p for p in listed if not p.rstrip("/").endswith((MANIFEST, INDEX))]
        if foreign:
            raise DataError(f"{out}: holds {len(foreign)} files mdn did not write (e.g. {foreign[0]}); choose an empty "
                            "folder or prefix for the shards")
        manifest, index = Manifest(data["target_column"], data.get("group_column"), rule, []), []
    known = {row["image"]: row for row in index}
    changed = sum(1 for e in labels.examples if e.image in known and float(known[e.image]["target"]) != e.target)
    if changed:
        log(f"note: {changed} images already in {out} have another label in {source.where} now; their shards keep the old one "
            "(shards never change: write a new shard set to use the new labels)")
    new = [e for e in labels.examples if e.image not in known]
    splits = assign_splits(new, source.root, rule["val_fraction"], rule["calibration_fraction"], rule["test_fraction"],
                           rule["split_seed"]).splits if new else []
    numbers = defaultdict(int)
    for shard in manifest.shards:
        split, number = SHARD_NAME.match(shard["name"]).groups()
        numbers[split] = max(numbers[split], int(number) + 1)
    by_split: dict[str, list[Example]] = defaultdict(list)
    for example, split in zip(new, splits):
        by_split[split].append(example)
    written = []
    for split in SPLITS:
        rows = by_split.get(split, [])
        for start in range(0, len(rows), per_shard):
            interrupts.check()
            chunk = rows[start : start + per_shard]
            name = f"{split}-{numbers[split]:06d}.tar"
            numbers[split] += 1
            buffer = io.BytesIO()
            with wds.TarWriter(buffer) as sink:
                for example in chunk:
                    record = {"image": example.image, "target": example.target, "split": split, "group": example.group}
                    sink.write({"__key__": f"{len(index):09d}", "bin": example.path.read_bytes(), "json": json.dumps(record).encode()})
                    index.append({**record, "target": repr(example.target), "group": example.group or "", "shard": name})
            try:
                fs.pipe_file(_join(base, name), buffer.getvalue())  # an object appears whole, or not at all
            except Exception as e:  # noqa: BLE001
                raise storage_error(_join(out, name), e) from None
            manifest.shards.append({"name": name, "split": split, "images": len(chunk)})
            written.append(name)
    order = {e.image: i for i, e in enumerate(new)}
    index[len(known):] = sorted(index[len(known):], key=lambda row: order[row["image"]])  # the labels file's order, as a folder run reads it
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["image", "target", "split", "group", "shard"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(index)
    try:  # the index, then the manifest: the manifest lists only shards whose index rows are in place
        fs.pipe_file(_join(base, INDEX), text.getvalue().encode())
        fs.pipe_file(_join(base, MANIFEST), (json.dumps(manifest.state(), indent=1) + "\n").encode())
    except Exception as e:  # noqa: BLE001
        raise storage_error(out, e) from None
    return {"shards": written, "images": len(new), "total_images": len(index), "total_shards": len(manifest.shards),
            "by_split": {s: len(v) for s, v in by_split.items()}}


def _read_index(text: str, where: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {"image", "target", "split", "shard"} <= set(rows[0]):
        raise DataError(f"{where}/{INDEX}: not the index of a shard set mdn wrote")
    return rows


# --- reading ----------------------------------------------------------------------------------------


class ShardSource:
    """A shard set mdn wrote (`data.shards`), read through fsspec and WebDataset."""

    root = None  # the images are records, not files

    def __init__(self, url: str, data: dict):
        self.url, self.data = url, data
        self.fs, self.base = _fs(url)
        self.remote = "file" not in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        try:
            manifest = self.fs.cat_file(_join(self.base, MANIFEST)).decode()
            index = self.fs.cat_file(_join(self.base, INDEX))
        except FileNotFoundError:
            raise DataError(f"{url}: no shard set there (no {MANIFEST}); write one with mdn shard LABELS.csv --output {url}") from None
        except Exception as e:  # noqa: BLE001
            raise storage_error(url, e) from None
        self.manifest = Manifest.parse(manifest, url)
        self.cache_dir = None  # where remote shards are kept once read (local ones are read in place)
        if self.remote:
            self.cache_dir = data.get("shard_cache_dir") or _default_cache_dir()
            try:
                Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(f"data.shard_cache_dir: cannot create {self.cache_dir} ({e.strerror or type(e).__name__}); "
                                "choose a writable folder") from None
        self.index = _read_index(index.decode(), url)
        self.sha256 = hashlib.sha256(index).hexdigest()
        if data.get("target_column", self.manifest.target_column) != self.manifest.target_column:
            raise DataError(f"{url}: its target column is {self.manifest.target_column!r}, the config's "
                            f"data.target_column is {data['target_column']!r}; set data.target_column: {self.manifest.target_column}")

    @property
    def where(self) -> str:
        return self.url

    def read(self, lenient: bool = False) -> Labels:
        examples = []
        for i, row in enumerate(self.index):
            target = float(row["target"])
            if self.data.get("target_transform") == "log" and not target > 0:
                raise DataError(f"{self.url}/{INDEX}:{i + 2}: target {target:g} of {row['image']} is not positive, which "
                                "data.target_transform: log needs")
            examples.append(Example(row["image"], Path(row["image"]), target, row["split"], i + 2, row.get("group") or None))
        return Labels(examples, [], self.sha256, len(examples))

    def recorded(self, splits_file: Path) -> list[Example]:
        known = {e.image: e for e in self.read().examples}
        out = []
        with open(splits_file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["image"] not in known:
                    raise DataError(f"{splits_file}: {row['image']} is not in the shard set {self.url}; resume with the shards "
                                    "the run started with")
                e = known[row["image"]]
                out.append(Example(e.image, e.path, float(row[self.manifest.target_column]), row["split"], e.line, e.group))
        return out

    def loader(self, examples: list[Example], image_size: int, batch_size: int, num_workers: int, *, train: bool = False,
               seed: int = 0, augment: Augment = Augment(), rank: int = 0, world_size: int = 1, cache: DecodedCache | None = None,
               pin_memory: bool = False, name: str = "images") -> ShardLoader:
        return ShardLoader(self, examples, image_size, batch_size, num_workers, train, seed, augment if train else Augment(), rank,
                           world_size, cache, name)

    def shard_url(self, name: str) -> str:
        return _join(self.url, name)


class ShardLoader:
    """Batches of some of a shard set's images (see the module's docstring for the order). Its
    worker processes live across epochs (`close` stops them), as the folder source's do."""

    def __init__(self, source: ShardSource, examples: list[Example], image_size: int, batch_size: int, num_workers: int,
                 train: bool, seed: int, augment: Augment, rank: int, world_size: int, cache: DecodedCache | None, name: str):
        self.stream = _Stream(source, examples, image_size, train, seed, augment, rank, world_size, cache)
        self.batch_size, self.train, self.name = batch_size, train, name
        # the same number of shards every epoch (round robin over a reordering), so the same workers
        self.workers = min(num_workers, len(self.stream.mine(0)))
        self.loader: Loader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch.fill_(epoch)  # shared with the workers, which read it when an epoch starts

    def __len__(self) -> int:
        """Batches an epoch: every process the same number under torchrun (the fullest one's)."""
        s = self.stream
        per_rank = [sum(s.counts[shard] for shard in s.mine(int(s.epoch), r)) for r in range(s.world_size)]
        return max(math.ceil(n / self.batch_size) for n in per_rank) if self.train else math.ceil(per_rank[s.rank] / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        steps = len(self)
        if self.loader is None:
            self.loader = Loader(self.stream, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                                 persistent_workers=self.workers > 0, prefetch_factor=4 * self.batch_size if self.workers else None,
                                 worker_init_fn=worker_init(self.name) if self.workers else None)
        items, good, done = [], 0, 0
        for item in self.loader:
            if isinstance(item, _Failure):
                if item.fatal:
                    raise DataError(item.message)
                items.append(item.message)  # an unreadable image: the batch carries its message, as for files
                continue
            items.append(item)
            good += 1
            if good == self.batch_size:
                yield collate(items)
                items, good, done = [], 0, done + 1
        if items:
            yield collate(items)
            done += 1
        while done < steps:  # under torchrun: as many steps as the fullest process, each image once
            yield collate([])
            done += 1

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def _identity(item):
    return item


@dataclass
class _Failure:
    message: str
    fatal: bool


class _Stream(IterableDataset):
    """One process's share of a split, per epoch: its shards (round robin over the epoch's order),
    split among its workers, read by WebDataset, shuffled in a buffer for training; yields the
    dataset items of ImageRegressionDataset, (image, target, position, seed)."""

    def __init__(self, source: ShardSource, examples: list[Example], image_size: int, train: bool, seed: int, augment: Augment,
                 rank: int, world_size: int, cache: DecodedCache | None):
        self.source, self.examples, self.image_size, self.train, self.seed = source, examples, image_size, train, seed
        self.augment, self.rank, self.world_size, self.cache = augment, rank, world_size, cache
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.position = {e.image: i for i, e in enumerate(examples)}
        shard_of = {row["image"]: row["shard"] for row in source.index}
        self.counts: dict[str, int] = defaultdict(int)
        for e in examples:
            self.counts[shard_of[e.image]] += 1
        self.shards = sorted(self.counts)

    def mine(self, epoch: int, rank: int | None = None) -> list[str]:
        """The shards process `rank` (this one's by default) reads in `epoch`, in reading order."""
        shards = list(self.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        return shards[(self.rank if rank is None else rank) :: self.world_size]

    def __iter__(self):
        import webdataset as wds

        epoch = int(self.epoch)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        data = self.source.data
        seeds = None
        if self.train:  # the seeds a folder run's SeededSampler gives each image in this epoch
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            torch.randperm(len(self.examples), generator=g)
            seeds = torch.randint(0, 2**62, (len(self.examples),), generator=g).tolist()
        failed: list[BaseException] = []

        def handler(e: BaseException) -> bool:
            failed.append(e)
            return data.get("on_bad_image") == "skip" and not _unreachable(e)  # skip the rest of a damaged shard, or stop

        _register_openers(self.source)
        urls = [self.source.shard_url(s) for s in self.mine(epoch)]
        try:
            ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker, handler=handler,
                                cache_dir=self.source.cache_dir, cache_size=int(float(data.get("shard_cache_gb") or 10) * 1e9),
                                url_to_name=_cache_name, empty_check=False)
            if self.train:
                ds = ds.shuffle(int(data.get("shuffle_buffer") or 1000), rng=random.Random(self.seed * 1_000_003 + epoch * 1000 + worker))
            for sample in ds:
                try:
                    record = json.loads(sample["json"])
                    position = self.position.get(record["image"])
                    if position is None:
                        continue  # an image of another split in the same shard, or left out of this run
                    if self.cache is not None:
                        image = self.cache.get(position, sample["bin"], self.image_size, name=record["image"])
                    else:
                        image = decode_square(sample["bin"], self.image_size, name=record["image"])
                except UnreadableImageError as e:
                    yield _Failure(str(e), False)
                    continue
                except (KeyError, ValueError) as e:
                    yield _Failure(f"{sample.get('__url__', 'a shard')}: a damaged record ({type(e).__name__}: {e}); write the shard "
                                   "set again", data.get("on_bad_image") != "skip")
                    continue
                seed = seeds[position] if seeds is not None else -1
                if self.augment and seed >= 0:
                    image = augment_image(image, self.augment, torch.Generator().manual_seed(seed))
                yield image, self.examples[position].target, position, seed
        except Exception as e:  # noqa: BLE001 - a shard that cannot be read: one line, from the main process
            failed.append(e)
        for e in failed:
            if _unreachable(e):  # the store, not the shard: no skipping past that
                yield _Failure(str(storage_error(self.source.url, e)), True)
            else:
                skip = data.get("on_bad_image") == "skip"
                what = "the rest of it was skipped (data.on_bad_image: skip)" if skip else \
                    "write the shard set again, or set data.on_bad_image: skip to train without it"
                yield _Failure(f"{self.source.url}: a shard cannot be read ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); {what}", not skip)


def _unreachable(e: BaseException) -> bool:
    """A store that cannot be reached or refuses the credentials (not a damaged shard)."""
    names = {type(c).__name__ for c in (e, e.__cause__, e.__context__) if c is not None}
    text = str(e)
    return isinstance(e, (PermissionError, ConnectionError)) or bool(names & {
        "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "NoCredentialsError", "ServerDisconnectedError",
    }) or any(w in text for w in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"))


def _default_cache_dir() -> str:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mdn-cli" / "shards")


def _cache_name(url: str) -> str:
    """A shard's file name in the cache: unique per URL (two sets both have train-000000.tar)."""
    return f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{url.rsplit('/', 1)[-1]}"


def _register_openers(source: ShardSource) -> None:
    """WebDataset opens URLs by scheme; give it fsspec's opener for the source's scheme. The
    filesystem is looked up in the process that reads (fsspec keeps one per process: an S3
    client made before a fork must not be used after it)."""
    import fsspec
    import webdataset as wds

    def opener(url, mode="rb", bufsize=8192, **kw):
        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, mode)

    if source.remote:
        for protocol in (source.fs.protocol,) if isinstance(source.fs.protocol, str) else source.fs.protocol:
            wds.gopen_schemes[protocol] = opener
