#!/usr/bin/env python
"""Which JPEG decoder mdn should use, by measurement: images/s of decode + centre square, one thread
(as in one loader worker), for each decoder and output size.

    python scripts/compare_decoders.py [--folder DIR] [--n 200] [--json out.json]

Decoders:
    pil            PIL's full-size decode, then mdn's resize of the crop box (images.square)
    pil-draft      what mdn does (images.decode_square): PIL's `draft` lets libjpeg decode at 1/2,
                   1/4 or 1/8 scale when the shorter side stays >= the output size, then the same resize
    torchvision    torchvision.io.decode_jpeg (libjpeg-turbo) at full size, then an antialiased
                   bilinear resize of the centre square in torch
Photos: synthetic ones at 320x240 (the bench's) and 1600x1200 (a phone photo's scale), and, with
--folder, the JPEGs there (for example ../shared/datasets/utkface-dev/images, 200x200 faces).
Each cell is the median of 3 passes over the photos, after one warm-up pass; the last column is
the mean absolute pixel difference from `pil` (0-255), to show the decoders agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_photos  # noqa: E402  (the bench's synthetic photos)

from mdn_cli.images import decode_square, load_rgb, square  # noqa: E402

SIZES = (96, 224)


def pil(path: Path, size: int) -> torch.Tensor:
    return square(load_rgb(path), size)


def pil_draft(path: Path, size: int) -> torch.Tensor:
    return decode_square(path, size)


def tv(path: Path, size: int) -> torch.Tensor:
    image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), mode=torchvision.io.ImageReadMode.RGB)
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top : top + side, left : left + side].float()[None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)


DECODERS = {"pil": pil, "pil-draft": pil_draft, "torchvision": tv}


def rate(decoder, paths: list[Path], size: int) -> float:
    for p in paths[: max(1, len(paths) // 4)]:
        decoder(p, size)
    passes = []
    for _ in range(3):
        started = time.perf_counter()
        for p in paths:
            decoder(p, size)
        passes.append(len(paths) / (time.perf_counter() - started))
    return statistics.median(passes)


def difference(decoder, paths: list[Path], size: int) -> float:
    diffs = [(decoder(p, size).float() - pil(p, size).float()).abs().mean().item() for p in paths[:20]]
    return statistics.mean(diffs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="also these JPEGs (e.g. ../shared/datasets/utkface-dev/images)")
    parser.add_argument("--n", type=int, default=200, help="photos per set (default 200)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker's share
    results = []
    with tempfile.TemporaryDirectory(prefix="mdn-decoders-") as tmp:
        sets = {"synthetic 320x240": make_photos(Path(tmp) / "small", args.n)[0]}
        import bench

        bench.PHOTO_SIZE = (1600, 1200)
        sets["synthetic 1600x1200"] = make_photos(Path(tmp) / "large", max(20, args.n // 4), seed=1)[0]
        if args.folder:
            sets[f"{args.folder.name} (JPEGs)"] = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.n]
        for name, paths in sets.items():
            for size in SIZES:
                row = {"photos": name, "size": size}
                for decoder_name, decoder in DECODERS.items():
                    row[decoder_name] = rate(decoder, paths, size)
                    row[f"{decoder_name}_diff"] = difference(decoder, paths, size)
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| photos | output px | " + " | ".join(f"{d} img/s (mean abs diff vs pil)" for d in DECODERS) + " |")
    print("|---|---|" + "---|" * len(DECODERS))
    for r in results:
        print(f"| {r['photos']} | {r['size']} | " + " | ".join(f"{r[d]:.0f} ({r[d + '_diff']:.2f})" for d in DECODERS) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
