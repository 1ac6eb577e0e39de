"""Choosing a run's settings from a labels file and the machine (`mdn train labels.csv`, `mdn init`).

Data and machine in, config out, each choice with its reason (written as a comment beside the key
in the YAML the run keeps, so `mdn train runs/NAME/config.yaml` repeats it and a reader sees why):
    columns         the image column (cells naming image files beside the CSV) and the target
                    column (the numeric one); several candidates -> an error listing them
    backbone        EfficientNet-Lite0: ImageNet weights that come with pip (no download)
    image size      the images' own size, capped by the device (128 px on a CPU, 224 on a GPU)
    batch, epochs   by the device and the number of training images
    schedule        one head-only epoch on cached features, then the whole network at 0.3x lr
    target          log(target) when it is positive and strongly right-skewed
    cache           decoded images in memory when they fit in a quarter of it
Nothing here reads more than the labels file and a few dozen images.
"""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .schema import Config
from .yaml_file import load_config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_NAMES = {"train", "val", "valid", "validation", "calibration", "test"}
SAMPLE_ROWS = 500
"""Rows read to tell the columns apart (all rows are read for the target's statistics)."""
SIZE_SAMPLE = 32
"""Images opened (headers only) to learn their size."""
SPAN_FOR_LOG = 10.0
SKEW_FOR_LOG = 1.0
"""log(target) is chosen for positive targets that span an order of magnitude (largest / smallest
>= SPAN_FOR_LOG: ages, weights of animals from pups to adults, prices) or are strongly skewed:
their errors grow with their size, which a model of the log treats alike everywhere."""


@dataclass(frozen=True)
class Machine:
    """What the planner needs to know about where the run will happen."""

    device: str
    """cuda, mps or cpu."""
    cores: int
    memory_bytes: int

    @classmethod
    def here(cls) -> Machine:
        import torch

        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        try:
            memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            memory = 4 << 30
        return cls(device, cores, memory)


@dataclass(frozen=True)
class DataFacts:
    """What the labels file says."""

    labels: Path
    image_column: str
    target_column: str
    split_column: str | None
    rows: int
    targets: list[float] = field(repr=False)
    image_side: int
    """Median shorter side of a sample of the images, in pixels."""

    @property
    def positive(self) -> bool:
        return min(self.targets) > 0

    def skew(self, log: bool = False) -> float:
        values = [math.log(t) for t in self.targets] if log else self.targets
        mean, sd = statistics.fmean(values), statistics.pstdev(values)
        return statistics.fmean([((v - mean) / sd) ** 3 for v in values]) if sd > 0 else 0.0


@dataclass
class Plan:
    config: Config
    facts: DataFacts
    reasons: dict[str, str]
    """Dotted key -> why it has its value (for the commented YAML and the printed plan)."""


def _numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def read_facts(labels: Path, image_column: str | None = None, target_column: str | None = None) -> DataFacts:
    """The columns of a labels CSV and what its rows hold. Columns given (from --set) are taken as
    they are; otherwise they are found, and more than one candidate is an error that lists them."""
    try:
        with open(labels, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            rows = [row for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DataError(f"{labels}: labels file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{labels}: cannot read the labels file ({e})") from None
    if not header or not rows:
        raise DataError(f"{labels}: expected a header line and one row per image (for example image,weight)")
    sample = rows[:SAMPLE_ROWS]
    cells = {name: [row[i].strip() for row in sample if i < len(row) and row[i].strip()] for i, name in enumerate(header)}
    root = labels.parent

    def images(name: str) -> bool:
        values = cells.get(name) or []
        return bool(values) and sum(1 for v in values if v.lower().endswith(IMAGE_SUFFIXES) and (root / v).is_file()) >= 0.9 * len(values)

    split = next((name for name in header if name.lower() == "split" and cells.get(name)
                  and {v.lower() for v in cells[name]} <= SPLIT_NAMES), None)
    if image_column is None:
        found = [name for name in header if images(name)]
        image_column = _one(found, "image", "cells naming image files next to the labels file", labels, "data.image_column",
                            header)
    if target_column is None:
        numeric = [name for name in header if name not in (image_column, split) and cells.get(name)  # a stray word is a label problem
                   and sum(map(_numeric, cells[name])) >= 0.9 * len(cells[name]) and len(set(cells[name])) > 1]
        target_column = _one(numeric, "target", "numbers", labels, "data.target_column", header)
    for key, name in (("data.image_column", image_column), ("data.target_column", target_column)):
        if name not in header:
            raise ConfigError(f"{labels}: {key}={name!r}, but the columns are {', '.join(header)}")
    ti, ii = header.index(target_column), header.index(image_column)
    targets = [float(row[ti]) for row in rows if ti < len(row) and _numeric(row[ti].strip())]
    if len(targets) < 2:
        raise DataError(f"{labels}: the {target_column} column holds {len(targets)} numbers; a model needs many labelled images")
    paths = [root / row[ii].strip() for row in rows[:: max(1, len(rows) // SIZE_SAMPLE)] if ii < len(row)][:SIZE_SAMPLE]
    return DataFacts(labels, image_column, target_column, split, len(rows), targets, _median_side(paths))


def _one(found: list[str], what: str, holding: str, labels: Path, key: str, header: list[str]) -> str:
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"{labels}: no {what} column (one whose cells are {holding}) among {', '.join(header)}; "
                          f"name it with --set {key}=COLUMN")
    raise ConfigError(f"{labels}: {len(found)} columns could be the {what} ({', '.join(found)}); choose one with "
                      f"--set {key}={found[0]}")


def _median_side(paths: list[Path]) -> int:
    from PIL import Image

    sides = []
    for path in paths:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except (OSError, ValueError, SyntaxError):
            continue  # the data check names unreadable files; here they only do not count
    return int(statistics.median(sides)) if sides else 224


def plan(labels: Path, machine: Machine, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """A config for training on `labels` on `machine`, `--set` overrides applied (and validated)
    last; with the reason for each choice."""
    labels = Path(labels)
    given = dict(item.split("=", 1) for item in overrides if "=" in item)
    facts = read_facts(labels, given.get("data.image_column"), given.get("data.target_column"))
    gpu = machine.device == "cuda"
    reasons: dict[str, str] = {}
    values: dict[str, object] = {}

    def choose(key: str, value, why: str) -> None:
        values[key], reasons[key] = value, why

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", labels.resolve().parent.name).strip("-.") or "run"
    choose("run.name", name[:100], "the labels file's folder")
    choose("data.root", str(labels.parent), "the labels file's folder: image paths are relative to it")
    choose("data.labels", labels.name, "the file this run was planned from")
    choose("data.image_column", facts.image_column, "its cells name image files beside the labels file")
    choose("data.target_column", facts.target_column, "the numeric column")
    choose("data.split_column", facts.split_column or "split",
           "the file's own split column" if facts.split_column else "none in the file: each image's split comes from a hash of its path")
    skew = facts.skew()
    low, high = min(facts.targets), max(facts.targets)
    if facts.positive and (high / low >= SPAN_FOR_LOG or skew > SKEW_FOR_LOG):
        choose("data.target_transform", "log", f"positive, from {low:g} to {high:g} (skewness {skew:.2f}): its errors grow with "
                                               "its size, so the model works on log(target)")
    else:
        why = "not strictly positive" if not facts.positive else f"from {low:g} to {high:g} (skewness {skew:.2f}): no need for a log"
        choose("data.target_transform", "none", why)
    cap = 224 if gpu else 128
    size = max(32, min(cap, 16 * round(facts.image_side / 16)))
    choose("data.image_size", size, f"the images' median shorter side is {facts.image_side} px; at most {cap} px on "
                                    f"{'a GPU' if gpu else 'this ' + machine.device.upper()}")
    decoded = facts.rows * 3 * size * size
    cache = "memory" if decoded < machine.memory_bytes / 4 else "none"
    choose("data.cache", cache, f"decoded, the images take {decoded / 1e9:.2f} GB: "
                                + ("decode them once and keep them in memory" if cache == "memory" else "too many to keep in memory"))
    choose("model.backbone", "efficientnet_lite0", "ImageNet weights that come with pip: no download, fast on CPUs")
    choose("model.pretrained", True, "start from ImageNet features")
    choose("model.dropout", 0.2, "pretrained features, a small head: mild dropout")
    n_train = facts.rows * (0.75 if not facts.split_column else 1.0)
    epochs = 30 if n_train < 1000 else 20 if n_train < 4000 else 16 if n_train < 20000 else 10
    choose("train.epochs", epochs, f"about {int(n_train)} training images: more epochs for fewer images")
    choose("train.batch_size", 64 if gpu else 32, "a GPU takes larger batches" if gpu else "a CPU: 32 images a step")
    choose("train.lr", 1.0e-3, "the head's learning rate; the backbone's is 0.3x (train.backbone_lr_scale)")
    choose("train.backbone_lr_scale", 0.3, "pretrained weights want a gentler update than the new head")
    choose("train.unfreeze_after", 1, "one head-only epoch on cached features, then the whole network")
    choose("train.early_stopping_patience", 5, "stop after 5 epochs without a better val NLL")
    text = "\n".join(f"{key}={_yaml_value(value)}" for key, value in values.items())
    overridden = [item.split("=", 1)[0] for item in overrides]
    for key in overridden:
        reasons[key] = "--set on the command line"
    config = load_config(None, [*text.splitlines(), *overrides])
    return Plan(config, facts, reasons)


def _yaml_value(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)
