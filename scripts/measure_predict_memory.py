#!/usr/bin/env python
"""Peak memory of `mdn predict` as the number of images grows: it must stay flat (predictions are
streamed to the output, never held).

    python scripts/measure_predict_memory.py -c runs/toy/best.pt [--counts 1000 5000 20000]

Writes the toy generator's images (scripts/make_toy_data.py, 64 px PNGs) into a temporary folder,
then for each count and backend runs `mdn predict FOLDER --format csv --output out.csv` in a
fresh process and reads that process's peak resident memory (getrusage's ru_maxrss, the main
process: the loader's workers are separate processes and hold a few batches each). Prints a
table: images, backend, peak MB, seconds, and the growth from the smallest count.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import atexit, resource, sys
atexit.register(lambda: print(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr))
from mdn_cli.__main__ import main
sys.argv = ["mdn", *sys.argv[1:]]
main()
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, required=True)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--backends", nargs="+", default=["auto", "torch"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mdn-predict-memory-") as tmp:
        made = Path(tmp) / "toy"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_toy_data.py"), "--out", str(made), "--n", str(max(args.counts)),
                        "--seed", "1"], check=True, capture_output=True)
        images = sorted((made / "images").iterdir())
        for count in sorted(args.counts):
            folder = Path(tmp) / f"n{count}"
            folder.mkdir()
            for p in images[:count]:
                (folder / p.name).symlink_to(p)
            for backend in args.backends:
                out = Path(tmp) / f"out-{count}-{backend}.csv"
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", RUN, "predict", str(folder), "-c", str(args.checkpoint), "--format", "csv",
                                       "--output", str(out), "--backend", backend], capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if done.returncode:
                    raise SystemExit(done.stderr[-2000:])
                peak_mb = int(done.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0]) / 1024
                lines = sum(1 for _ in open(out)) - 1
                rows.append((count, backend, peak_mb, seconds, lines))
                print(f"{count} images, --backend {backend}: peak {peak_mb:.0f} MB, {seconds:.1f} s, {lines} rows", file=sys.stderr)
            shutil.rmtree(folder)
    base = {b: next(r[2] for r in rows if r[1] == b) for b in args.backends}
    print("| images | backend | peak RSS of mdn predict (MB) | growth from the smallest count (MB) | seconds |")
    print("|---|---|---|---|---|")
    for count, backend, peak, seconds, _ in rows:
        print(f"| {count} | {backend} | {peak:.0f} | {peak - base[backend]:+.0f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
