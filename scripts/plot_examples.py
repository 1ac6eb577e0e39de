#!/usr/bin/env python
"""Render every plot mdn makes from synthetic predictions, without training: to look at them.

    python scripts/plot_examples.py --out /tmp/mdn-plots

Writes evaluation plots at 40 and 3000 images (plain and log target), density plots for a
unimodal, a bimodal, a log-target and an unfamiliar image (with highest-density regions and
modes, as a prediction record carries them), and training curves at 1 and 200 epochs.
The tests use the same builders (`synthetic_evaluation`, `synthetic_prediction`, `synthetic_history`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from mdn_cli import metrics
from mdn_cli import mixture as mx
from mdn_cli.calibration import DEFAULT_LEVELS, Calibration, level_key
from mdn_cli.calibration.scale import StdScale
from mdn_cli.evaluate import Evaluation
from mdn_cli.data.labels import Example
from mdn_cli.predict import summarize

LABEL = "weight (lb)"


def synthetic_evaluation(n: int, transform: str = "none", seed: int = 0) -> Evaluation:
    """n images of the toy puppies (a two-breed mixture), scored against a slightly overconfident
    model whose stds a fitted scale of 1.2 repairs, as `evaluate.score_examples` would score them."""
    g = torch.Generator().manual_seed(seed)
    s, c = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    breed = torch.randint(0, 2, (n,), generator=g).double()
    base, spread = 4 + 8 * s + 3 * c, 0.4 + 0.8 * s
    y = base + 5 * breed + spread * torch.randn(n, generator=g, dtype=torch.float64)
    y = y.clamp_min(0.5)
    noise = 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    means = torch.stack([base, base + 5], -1) + noise
    stds = spread.unsqueeze(-1).expand(n, 2) / 1.2
    if transform == "log":  # the same answer as a mixture of log-normals
        stds, means = stds / means, means.log()
    raw = mx.Mixture(torch.full((n, 2), 0.5), means, stds, transform)
    pred = Calibration("scale", StdScale.constant_factor(1.2, n)).apply(raw)
    result = metrics.score(pred, y, DEFAULT_LEVELS)
    result["conditional"] = metrics.conditional_coverage(pred, y)
    examples = [Example(f"images/{i:05d}.png", Path(f"/data/images/{i:05d}.png"), float(v), "test", i + 2) for i, v in enumerate(y.tolist())]
    return Evaluation(result, examples, pred, raw)


def grid_regions(m: mx.Mixture, levels=DEFAULT_LEVELS) -> dict:
    """Highest-density regions and modes of row 0 of `m`, on a fine grid: what a prediction record
    carries (`hdr_68`, `hdr_95`, `modes`), close enough to draw."""
    q = mx.quantile(m, [1e-5, 1 - 1e-5])[0].tolist()
    x = torch.linspace(q[0], q[1], 20001, dtype=torch.float64)
    rows = mx.Mixture(m.weights[:1].expand(len(x), -1), m.means[:1].expand(len(x), -1), m.stds[:1].expand(len(x), -1), m.transform)
    p = mx.log_prob(rows, x).exp()
    mass = p * (x[1] - x[0])
    out: dict = {}
    for level in levels:
        order = torch.argsort(p, descending=True)
        threshold = p[order][int(torch.searchsorted(mass[order].cumsum(0), torch.tensor(level, dtype=torch.float64)))]
        inside = (p >= threshold).int()
        edges = torch.nonzero(inside.diff()).flatten().tolist()
        starts = ([0] if inside[0] else []) + [e + 1 for e in edges if inside[e + 1]]
        ends = [e for e in edges if inside[e]] + ([len(x) - 1] if inside[-1] else [])
        out[f"hdr_{level_key(level)}"] = [[float(x[a]), float(x[b])] for a, b in zip(starts, ends)]
    peaks = (torch.nonzero((p[1:-1] >= p[:-2]) & (p[1:-1] > p[2:])).flatten() + 1).tolist()
    valleys = [0] + [int(torch.argmin(p[a:b])) + a for a, b in zip(peaks, peaks[1:])] + [len(x) - 1]
    out["modes"] = [{"location": float(x[i]), "mass": float(mass[valleys[j] : valleys[j + 1]].sum())} for j, i in enumerate(peaks)]
    return out


def blob_image(size: int = 96, radius: float = 0.3, seed: int = 0) -> np.ndarray:
    """A light background with one brown blob (the toy puppy), (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    inside = (xx**2 + (yy * 1.15) ** 2) < radius**2
    img = np.full((size, size, 3), 225.0) + rng.normal(0, 6, (size, size, 3))
    img[inside] = (120, 80, 40)
    return img.clip(0, 255).astype(np.uint8)


def synthetic_prediction(kind: str) -> tuple[np.ndarray, mx.Mixture, dict]:
    """(image, scaled mixture (1 row), prediction record) for kind in unimodal, bimodal, log,
    unfamiliar; every record but the unimodal one carries `hdr_*` and `modes`."""
    mixtures = {
        "unimodal": ([[0.7, 0.3]], [[10.0, 11.0]], [[1.0, 1.5]], "none"),
        "bimodal": ([[0.55, 0.45]], [[7.5, 13.0]], [[0.9, 1.1]], "none"),
        "log": ([[0.8, 0.2]], [[math.log(8.0), math.log(20.0)]], [[0.25, 0.3]], "log"),
        "unfamiliar": ([[0.4, 0.35, 0.25]], [[6.0, 12.0, 18.0]], [[1.5, 2.5, 2.0]], "none"),
    }
    w, mu, s, transform = mixtures[kind]
    m = mx.Mixture(torch.tensor(w), torch.tensor(mu), torch.tensor(s), transform)
    ood = torch.tensor([2.4 if kind == "unfamiliar" else 0.3], dtype=torch.float64)
    record = summarize(Calibration().attach(m), DEFAULT_LEVELS, ood_scores=ood)[0]
    if kind != "unimodal":
        record.update(grid_regions(m))
    return blob_image(seed=len(kind)), m, record


def synthetic_history(epochs: int, seed: int = 0) -> list[dict]:
    """metrics.csv rows of a plausible run: warm-up then cosine learning rate, val NLL that bottoms
    out and rises again (overfitting), train NLL that keeps falling."""
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(1, epochs + 1):
        t = e / max(epochs, 1)
        lr = 3e-4 * min(1.0, e / 2) * (0.5 * (1 + math.cos(math.pi * max(0.0, (e - 2) / max(epochs - 2, 1)))))
        val = 3.0 - 1.2 * (1 - math.exp(-5 * t)) + 0.5 * max(0.0, t - 0.6) ** 2 + 0.03 * rng.normal()
        rows.append({"epoch": e, "train_nll": 3.1 - 1.6 * (1 - math.exp(-4 * t)) + 0.03 * rng.normal(), "val_nll": val,
                     "val_nll_calibrated": val - 0.08, "val_mae": 2.0 - 0.9 * (1 - math.exp(-5 * t)) + 0.02 * rng.normal(),
                     "lr": lr, "images_per_s": 900.0, "seconds": 4.0})
    return rows


def main() -> None:
    from mdn_cli.curves import write_curves
    from mdn_cli.plots import density_plot, evaluation_plots

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mdn-plots"))
    args = parser.parse_args()
    for n in (40, 3000):
        for transform in ("none", "log"):
            folder = args.out / f"eval-{n}-{transform}"
            folder.mkdir(parents=True, exist_ok=True)
            evaluation_plots(synthetic_evaluation(n, transform), folder, LABEL)
    for kind in ("unimodal", "bimodal", "log", "unfamiliar"):
        image, m, record = synthetic_prediction(kind)
        density_plot(image, m, record, LABEL, f"photos/{kind}-puppy.jpg", args.out / f"density-{kind}.png")
    for epochs in (1, 200):
        history = synthetic_history(epochs)
        best = min(history, key=lambda r: r["val_nll_calibrated"])["epoch"]
        write_curves(history, args.out / f"curves-{epochs}.png", best, LABEL)
    print(f"wrote plots to {args.out}")


if __name__ == "__main__":
    main()
