"""`mdn check-data`: one pass over a labelled image set, finding what would spoil a run.

    files       rows whose image is missing, unreadable, truncated or not a regular file; images
                under MIN_SIDE pixels; unusual modes (CMYK, 16-bit, alpha, palette) that mdn
                converts but a user may not expect
    duplicates  exact copies (the same bytes) and near copies (the same photo resized or
                re-compressed: imagehash's pHash, a 64-bit candidate confirmed by a 256-bit one), each
                pair named with its two paths and their splits; above all the pairs across splits,
                a leak of test (or val, or calibration) images into training
    labels      cells that are not numbers, values the target transform cannot take, outliers
                (robust z-score above OUTLIER_Z), a skew that calls for the log transform; and a
                histogram of the labels (label_histogram.png)
The splits are those a run would use (the split column, or the hash rule of splits.py), so what
is reported across splits is what training would see. `mdn train` runs the cheap part itself:
exact copies across splits, before epoch 1 (`cross_split_copies`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import interrupts
from .config import Config
from .files import atomic_writer, write_text_atomic
from .images import UnreadableImageError, load_rgb
from .data.labels import Example, read_labels
from .data.splits import assign_splits

MIN_SIDE = 32
NEAR_BITS = 4
"""Perceptual hashes (64 bits) this close or closer make two photos candidates for near copies..."""
FINE_BITS = 40
"""...confirmed when their 256-bit perceptual hashes (16x16 DCT) are this close or closer. On
utkface-dev (aligned, cropped faces, which look alike to a coarse hash), 14 of 20 candidate pairs
4 bits apart were different people: those lay 60-92 bits apart on the fine hash, the true copies
(re-compressed, recoloured, slightly re-cropped) 2-26."""
OUTLIER_Z = 5.0
_BANDS = 5  # 5 bands of <= 13 bits: two hashes within 4 bits agree on at least one band (pigeonhole)


@dataclass
class Pair:
    a: Example
    b: Example
    split_a: str
    split_b: str
    kind: str
    """exact | near."""
    distance: int = 0
    """Bits in which their perceptual hashes differ (near copies)."""

    @property
    def crosses(self) -> bool:
        return self.split_a != self.split_b


@dataclass
class Report:
    labels: Path
    rows: int
    examples: int
    label_problems: list[str] = field(default_factory=list)
    file_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Not problems, but worth knowing (odd modes, skew)."""
    pairs: list[Pair] = field(default_factory=list)
    outliers: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def problems(self) -> int:
        return len(self.label_problems) + len(self.file_problems) + len(self.pairs) + len(self.outliers)

    def summary(self) -> dict:
        crossing = [p for p in self.pairs if p.crosses]
        return {"labels": str(self.labels), "rows": self.rows, "usable_images": self.examples, "splits": self.split_counts,
                "label_problems": len(self.label_problems), "file_problems": len(self.file_problems),
                "exact_duplicate_pairs": sum(p.kind == "exact" for p in self.pairs),
                "near_duplicate_pairs": sum(p.kind == "near" for p in self.pairs),
                "pairs_across_splits": len(crossing),
                "test_images_with_a_copy_in_train": len({(p.a if p.split_a == "test" else p.b).image for p in crossing
                                                          if {p.split_a, p.split_b} == {"test", "train"}}),
                "outliers": len(self.outliers), "seconds": round(self.seconds, 1)}


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exact_copies(examples: list[Example]) -> list[list[int]]:
    """Groups (indices into `examples`, two or more) of files with the same bytes. Only files of the
    same size are read: cheap enough for training to run on every new run."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        try:
            by_size[e.path.stat().st_size].append(i)
        except OSError:
            continue
    groups = []
    for same_size in (v for v in by_size.values() if len(v) > 1):
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i in same_size:
            try:
                by_hash[file_hash(examples[i].path)].append(i)
            except OSError:
                continue
        groups += [g for g in by_hash.values() if len(g) > 1]
    return groups


def cross_split_copies(examples: list[Example], splits: list[str]) -> list[tuple[Example, Example, str, str]]:
    """Exact copies that sit in two different splits: (a, b, split of a, split of b)."""
    out = []
    for group in exact_copies(examples):
        for x, i in enumerate(group):
            for j in group[x + 1 :]:
                if splits[i] != splits[j]:
                    out.append((examples[i], examples[j], splits[i], splits[j]))
    return out


def _near_pairs(hashes: list[int | None], skip: set[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(i, j, distance) of 64-bit hashes within NEAR_BITS bits, by banding: hashes that close agree
    on one of _BANDS bands, so only hashes sharing a band are compared."""
    widths = [64 // _BANDS + (1 if b < 64 % _BANDS else 0) for b in range(_BANDS)]
    found: dict[tuple[int, int], int] = {}
    shift = 0
    for width in widths:
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            if h is not None:
                buckets[(h >> shift) & ((1 << width) - 1)].append(i)
        for members in buckets.values():
            for x, i in enumerate(members):
                for j in members[x + 1 :]:
                    if (i, j) not in found and (i, j) not in skip:
                        distance = bin(hashes[i] ^ hashes[j]).count("1")
                        if distance <= NEAR_BITS:
                            found[(i, j)] = distance
        shift += width
    return [(i, j, d) for (i, j), d in sorted(found.items())]


def check_data(labels: Path, cfg: Config, out: Path, log: Callable[[str], None] = print,
               progress: Callable[[int, int], None] = lambda done, total: None) -> Report:
    """Check the data set `cfg.data` describes (labels file `labels`); write report.json,
    duplicates.csv and label_histogram.png into `out`."""
    import time

    import imagehash

    started = time.perf_counter()
    d = cfg.data
    read = read_labels(labels, Path(d.root), d.image_column, d.target_column, d.split_column, d.target_transform,
                       d.group_column, lenient=True)
    examples = read.examples
    report = Report(labels, read.rows, len(examples), label_problems=list(read.problems), notes=list(read.notes))
    split_plan = assign_splits(examples, Path(d.root), d.val_fraction, d.calibration_fraction, d.test_fraction, d.split_seed)
    splits = split_plan.splits
    report.split_counts = {s: splits.count(s) for s in dict.fromkeys(["train", "val", "calibration", "test"])}

    # one pass over the images: decode each fully (a truncated file fails here), note its mode and size, hash it
    hashes: list[int | None] = []
    modes: dict[str, list[str]] = defaultdict(list)
    for i, e in enumerate(examples):
        interrupts.check()
        progress(i, len(examples))
        try:
            from PIL import Image

            with Image.open(e.path) as raw:
                mode = raw.mode
            image = load_rgb(e.path)
        except (UnreadableImageError, OSError) as err:
            report.file_problems.append(str(err).splitlines()[0] if isinstance(err, UnreadableImageError) else f"{e.image}: {err}")
            hashes.append(None)
            continue
        if mode in ("CMYK", "I;16", "I;16B", "I;16L", "I", "F", "RGBA", "LA", "PA", "P"):
            modes[mode].append(e.image)
        if min(image.size) < MIN_SIDE:
            report.file_problems.append(f"{e.image}: only {image.size[0]}x{image.size[1]} pixels (under {MIN_SIDE}): "
                                        "too small to say much; remove it or find a larger copy")
        hashes.append(int(str(imagehash.phash(image)), 16))
    for mode, names in modes.items():
        what = {"CMYK": "CMYK (print) colours", "RGBA": "an alpha channel", "LA": "an alpha channel", "PA": "an alpha channel",
                "P": "a palette"}.get(mode, "16-bit or float pixels")
        report.notes.append(f"{len(names)} images with {what} ({mode}; mdn converts them to 8-bit RGB, alpha flattened on white), "
                            f"e.g. {names[0]}")

    exact = exact_copies(examples)
    seen: set[tuple[int, int]] = set()
    for group in exact:
        for x, i in enumerate(group):
            for j in group[x + 1 :]:
                seen.add((i, j))
                report.pairs.append(Pair(examples[i], examples[j], splits[i], splits[j], "exact"))
    fine: dict[int, imagehash.ImageHash] = {}

    def fine_hash(i: int) -> imagehash.ImageHash:
        if i not in fine:
            fine[i] = imagehash.phash(load_rgb(examples[i].path), hash_size=16)
        return fine[i]

    for i, j, distance in _near_pairs(hashes, seen):
        if fine_hash(i) - fine_hash(j) <= FINE_BITS:  # aligned faces share a coarse hash; the fine one tells them apart
            report.pairs.append(Pair(examples[i], examples[j], splits[i], splits[j], "near", distance))
    report.pairs.sort(key=lambda p: (not p.crosses, p.kind != "exact", p.distance, p.a.image))

    _check_targets(report, [e.target for e in examples], examples, d.target_transform)
    report.seconds = time.perf_counter() - started
    _write(report, out, d.target_column)
    return report


def _check_targets(report: Report, targets: list[float], examples: list[Example], transform: str) -> None:
    if len(targets) < 3:
        return
    median = statistics.median(targets)
    mad = statistics.median([abs(t - median) for t in targets]) * 1.4826
    if mad > 0:
        for e in examples:
            z = (e.target - median) / mad
            if abs(z) > OUTLIER_Z:
                report.outliers.append(f"{e.image}: {e.target:g} is {abs(z):.1f} robust standard deviations from the median "
                                       f"{median:g} (line {e.line}); check the label")
    mean, sd = statistics.fmean(targets), statistics.pstdev(targets)
    skew = statistics.fmean([((t - mean) / sd) ** 3 for t in targets]) if sd > 0 else 0.0
    low, high = min(targets), max(targets)
    if transform != "log" and low > 0 and (high / low >= 10 or skew > 1):
        report.suggestions.append(f"the labels are positive, from {low:g} to {high:g} (skewness {skew:.2f}): consider "
                                  "data.target_transform: log (errors that grow with the value are then treated alike)")


def _write(report: Report, out: Path, target: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out / "duplicates.csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "hash_bits_apart", "image_a", "split_a", "image_b", "split_b", "across_splits"])
        for p in report.pairs:
            writer.writerow([p.kind, p.distance, p.a.image, p.split_a, p.b.image, p.split_b, p.crosses])
    detail = {**report.summary(), "label_problems": report.label_problems, "file_problems": report.file_problems,
              "outliers": report.outliers, "notes": report.notes, "suggestions": report.suggestions}
    write_text_atomic(out / "report.json", json.dumps(detail, indent=2) + "\n")
    targets = []
    try:
        targets = [float(r[target]) for r in csv.DictReader(open(report.labels, newline="", encoding="utf-8-sig"))
                   if _number(r.get(target))]
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    if targets:
        from .plots import label_histogram

        label_histogram(targets, out / "label_histogram.png", target, report.labels)


def _number(text) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def format_report(report: Report, out: Path, shown: int = 10) -> str:
    """The report as the terminal shows it: the summary first, then each kind of problem."""
    s = report.summary()
    crossing = [p for p in report.pairs if p.crosses]
    lines = [f"{report.labels}: {report.rows} rows, {report.examples} usable images "
             f"({' / '.join(f'{n} {k}' for k, n in report.split_counts.items())}), checked in {report.seconds:.1f} s"]

    def section(title: str, items: list[str]) -> None:
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {item}" for item in items[:shown])
            if len(items) > shown:
                lines.append(f"  ... and {len(items) - shown} more (all in {out / 'report.json'})")

    section("label problems (rows left out)", report.label_problems)
    section("image problems", report.file_problems)
    section("copies across splits (a leak: the same photo in two splits inflates every test figure)",
            [f"{p.kind}{'' if p.kind == 'exact' else f' ({p.distance} bits apart)'}: {p.a.image} ({p.split_a}) = "
             f"{p.b.image} ({p.split_b})" for p in crossing])
    section("copies within a split", [f"{p.kind}{'' if p.kind == 'exact' else f' ({p.distance} bits apart)'}: {p.a.image} = "
                                      f"{p.b.image} ({p.split_a})" for p in report.pairs if not p.crosses])
    section("label outliers", report.outliers)
    section("notes", report.notes + report.suggestions)
    lines.append(f"summary: {s['exact_duplicate_pairs']} exact and {s['near_duplicate_pairs']} near-duplicate pairs "
                 f"({s['pairs_across_splits']} across splits; {s['test_images_with_a_copy_in_train']} test images with a copy "
                 f"in train), {s['label_problems']} label problems, {s['file_problems']} image problems, {s['outliers']} outliers")
    lines.append(f"wrote report.json, duplicates.csv and label_histogram.png to {out}")
    return "\n".join(lines) + "\n"
