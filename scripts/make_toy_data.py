#!/usr/bin/env python
"""Generate a synthetic "puppies" dataset for mdn-cli.

Each image shows one anti-aliased, slightly elliptical blob (the puppy) on a
light, softly textured background.  Two latent variables are visible:

* size  s ~ U(0, 1): blob radius = (0.10 + 0.30 * s) * PX
* colour c ~ U(0, 1): blob colour interpolates dark brown -> light golden

A third one, the "breed" b ~ Bernoulli(0.5), is invisible.  The label is

    weight [lb] = 4 + 8 s + 3 c + 5 b + eps,   eps ~ N(0, (0.4 + 0.8 s)^2)

so the true conditional distribution of the weight given the image is a
two-component Gaussian mixture (weights 0.5/0.5, means m and m + 5 with
m = 4 + 8 s + 3 c, common std 0.4 + 0.8 s).  It is written to truth.csv so
that oracle NLL / CRPS can be computed later.

Usage::

    python scripts/make_toy_data.py --out data/toy [--n 2000] [--seed 0] [--size 64]

Only numpy and Pillow are needed; the module can also be loaded with
importlib from its path and used through ``make_toy_dataset`` / ``main``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# --- generative constants (kept in one place so the README/tests can refer to them)
SUPERSAMPLE = 4  # blob masks are drawn at 4x resolution, then LANCZOS-downsampled
RADIUS_MIN, RADIUS_MAX = 0.10, 0.40  # blob radius as a fraction of the image size
ASPECT_MIN, ASPECT_MAX = 0.85, 1.15  # rx / ry of the ellipse (area stays pi r^2)
DARK_BROWN = np.array([92.0, 56.0, 30.0])  # colour at c = 0
LIGHT_GOLDEN = np.array([226.0, 182.0, 98.0])  # colour at c = 1
SPOT_COLOUR = np.array([38.0, 24.0, 16.0])
MIN_SIZE = 16

BASE_WEIGHT = 4.0
SIZE_COEF = 8.0
COLOUR_COEF = 3.0
BREED_SHIFT = 5.0
NOISE_STD_BASE = 0.4
NOISE_STD_SIZE = 0.8
# With --groups: an invisible "site" column, A or B (p = 0.5 each); site B weighs its puppies on a
# worse scale, which adds N(0, SITE_B_EXTRA_STD^2) to the label. The image cannot tell the sites
# apart, so only a calibration by group can give each site the coverage it is promised.
SITE_B_EXTRA_STD = 1.5


def true_mixture(s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (mean_1, mean_2, std) of the true conditional mixture (weights 0.5 each)."""
    mean_1 = BASE_WEIGHT + SIZE_COEF * s + COLOUR_COEF * c
    mean_2 = mean_1 + BREED_SHIFT
    std = NOISE_STD_BASE + NOISE_STD_SIZE * s
    return mean_1, mean_2, std


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, slightly tinted surface with a soft low-frequency texture (float HxWx3)."""
    brightness = rng.uniform(208.0, 242.0)
    tint = rng.uniform(-8.0, 4.0, size=3) * np.array([0.3, 0.6, 1.0])  # warm-ish paper/floor
    base = brightness + tint
    # low-frequency luminance texture: a coarse random grid, bicubically upsampled
    g = int(rng.integers(3, 7))
    coarse = rng.normal(0.0, 1.0, size=(g, g)).astype(np.float32)
    tex = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC),
        dtype=np.float64,
    )
    tex_amp = rng.uniform(2.0, 5.0)
    # a gentle linear illumination gradient
    ang = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.arange(size) + 0.5) / size - 0.5
    grad = (np.cos(ang) * ramp[None, :] + np.sin(ang) * ramp[:, None]) * rng.uniform(0.0, 10.0)
    lum = tex_amp * tex + grad
    return base[None, None, :] + lum[:, :, None]


def _ellipse_uv(xx, yy, cx, cy, rx, ry, theta):
    dx = xx - cx
    dy = yy - cy
    ct, st = np.cos(theta), np.sin(theta)
    u = (dx * ct + dy * st) / rx
    v = (-dx * st + dy * ct) / ry
    return u * u + v * v


def _render_image(rng: np.random.Generator, s: float, c: float, size: int) -> np.ndarray:
    """Render one uint8 RGB image (size x size x 3) for latent size s and colour c."""
    bg = _background(rng, size)

    # --- blob geometry (in low-res pixel units)
    r = (RADIUS_MIN + (RADIUS_MAX - RADIUS_MIN) * s) * size
    aspect = rng.uniform(ASPECT_MIN, ASPECT_MAX)
    rx, ry = r * np.sqrt(aspect), r / np.sqrt(aspect)
    theta = rng.uniform(0.0, np.pi)
    # half extents of the rotated ellipse's bounding box
    hx = np.sqrt((rx * np.cos(theta)) ** 2 + (ry * np.sin(theta)) ** 2)
    hy = np.sqrt((rx * np.sin(theta)) ** 2 + (ry * np.cos(theta)) ** 2)
    # keep the blob (and LANCZOS ringing) off the border pixels; the largest blob spans
    # 2 * 0.40 * sqrt(1.15) = 0.86 of the image, so this always leaves room
    margin = 1.5 * min(1.0, size / 64.0)
    cx = rng.uniform(hx + margin, size - hx - margin)
    cy = rng.uniform(hy + margin, size - hy - margin)

    # --- spots (ears/eyes): count and placement random, no information about the label
    n_spots = int(rng.integers(0, 4))
    spots = []
    for _ in range(n_spots):
        rho = np.sqrt(rng.uniform(0.0, 1.0)) * 0.55
        phi = rng.uniform(0.0, 2.0 * np.pi)
        spots.append(
            (
                cx + rho * r * np.cos(phi),
                cy + rho * r * np.sin(phi),
                rng.uniform(0.08, 0.16) * r + 0.4,
                rng.uniform(0.55, 0.9),
            )
        )

    # --- supersampled masks, computed only on a padded crop around the blob
    ss = SUPERSAMPLE
    pad = 4  # low-res pixels of empty margin so LANCZOS sees the whole edge
    X0 = max(0, int(np.floor(cx - hx)) - pad)
    X1 = min(size, int(np.ceil(cx + hx)) + pad)
    Y0 = max(0, int(np.floor(cy - hy)) - pad)
    Y1 = min(size, int(np.ceil(cy + hy)) + pad)
    xx = ((np.arange(X0 * ss, X1 * ss) + 0.5) / ss)[None, :]
    yy = ((np.arange(Y0 * ss, Y1 * ss) + 0.5) / ss)[:, None]
    crop_wh = (X1 - X0, Y1 - Y0)

    def _downsample(mask_big: np.ndarray) -> np.ndarray:
        small = Image.fromarray(mask_big.astype(np.uint8) * np.uint8(255)).resize(
            crop_wh, Image.Resampling.LANCZOS
        )
        full = np.zeros((size, size), dtype=np.float64)
        full[Y0:Y1, X0:X1] = np.asarray(small, dtype=np.float64) / 255.0
        return full

    alpha = _downsample(_ellipse_uv(xx, yy, cx, cy, rx, ry, theta) <= 1.0)

    # --- blob colour with soft shading (darker towards the rim) and fur-ish noise
    colour = DARK_BROWN + c * (LIGHT_GOLDEN - DARK_BROWN)
    lx = (np.arange(size) + 0.5)[None, :]
    ly = (np.arange(size) + 0.5)[:, None]
    d2 = np.minimum(_ellipse_uv(lx, ly, cx, cy, rx, ry, theta), 1.0)
    shade = 1.06 - 0.14 * d2
    blob = colour[None, None, :] * shade[:, :, None]
    blob = blob + rng.normal(0.0, 3.0, size=(size, size, 1))

    img = bg * (1.0 - alpha[:, :, None]) + blob * alpha[:, :, None]

    if spots:
        sub = np.zeros((yy.shape[0], xx.shape[1]), dtype=bool)
        for sx, sy, sr, _ in spots:
            sub |= (xx - sx) ** 2 + (yy - sy) ** 2 <= sr * sr
        spot_alpha = _downsample(sub)
        opacity = float(np.mean([sp[3] for sp in spots]))
        sa = (spot_alpha * alpha * opacity)[:, :, None]  # spots never leave the blob
        img = img * (1.0 - sa) + SPOT_COLOUR[None, None, :] * sa

    # fine sensor-like grain over everything
    img = img + rng.normal(0.0, 1.5, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_toy_dataset(out: Path, n: int = 2000, seed: int = 0, size: int = 64, groups: bool = False) -> Path:
    """Write the toy dataset to ``out`` and return the path of ``labels.csv``.

    Deterministic given ``seed``.  An existing ``out/images`` folder is emptied first
    so that it matches ``labels.csv`` exactly. ``groups``: add the ``site`` column (see
    SITE_B_EXTRA_STD); the images and the other labels' randomness are the same as without it.
    """
    n = int(n)
    size = int(size)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} px, got {size}")

    out = Path(out)
    img_dir = out / "images"
    if img_dir.is_symlink() or img_dir.is_file():
        img_dir.unlink()
    elif img_dir.is_dir():
        shutil.rmtree(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    # latent variables and labels first (vectorised), then per-image appearance
    s = rng.uniform(0.0, 1.0, size=n)
    c = rng.uniform(0.0, 1.0, size=n)
    b = rng.integers(0, 2, size=n)
    z = rng.normal(0.0, 1.0, size=n)
    mean_1, mean_2, std = true_mixture(s, c)
    weight = mean_1 + BREED_SHIFT * b + std * z
    assert np.all(weight > 0), "toy weights must be positive"

    width = max(5, len(str(n - 1)))
    names = [f"images/{i:0{width}d}.png" for i in range(n)]
    for i in range(n):
        arr = _render_image(rng, float(s[i]), float(c[i]), size)
        Image.fromarray(arr).save(out / names[i], format="PNG")

    site = np.array(["A"] * n)
    if groups:  # drawn after every image, so that the images and the other labels stay as without groups
        site = np.where(rng.integers(0, 2, size=n) == 1, "B", "A")
        extra = rng.normal(0.0, SITE_B_EXTRA_STD, size=n)
        weight = np.where(site == "B", np.maximum(weight + extra, 0.1), weight)
        std = np.where(site == "B", np.sqrt(std**2 + SITE_B_EXTRA_STD**2), std)

    labels_path = out / "labels.csv"
    with open(labels_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("image,weight,site\n" if groups else "image,weight\n")
        for name, w, g in zip(names, weight, site):
            f.write(f"{name},{w:.4f},{g}\n" if groups else f"{name},{w:.4f}\n")

    with open(out / "truth.csv", "w", encoding="utf-8", newline="\n") as f:
        f.write("image,weight_1,mean_1,std_1,weight_2,mean_2,std_2\n")
        for name, m1, m2, sd in zip(names, mean_1, mean_2, std):
            f.write(f"{name},0.500000,{m1:.6f},{sd:.6f},0.500000,{m2:.6f},{sd:.6f}\n")

    with open(out / "README.md", "w", encoding="utf-8", newline="\n") as f:
        f.write(
            f"Synthetic 'puppies' toy data: {n} RGB {size}x{size} PNGs of one blob on a light "
            "background; label = weight in lb = 4 + 8*size + 3*colour + 5*breed(invisible, p=0.5) "
            "+ N(0, (0.4+0.8*size)^2), so the true conditional is a 2-component mixture (truth.csv).\n"
        )
        f.write(
            f"Generated by `python scripts/make_toy_data.py --out {out} --n {n} --seed {seed} "
            f"--size {size}` (numpy default_rng({seed}); deterministic).\n"
        )
    return labels_path


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_toy_data.py",
        description="Write a synthetic 'puppies' dataset (images + weight labels + true mixture).",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--groups", action="store_true",
                   help=f"add an invisible 'site' column (A/B); site B's labels carry N(0, {SITE_B_EXTRA_STD}^2) more noise")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1 (got {args.n})")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be >= {MIN_SIZE} (got {args.size})")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0 (got {args.seed})")
    labels = make_toy_dataset(args.out, n=args.n, seed=args.seed, size=args.size, groups=args.groups)
    print(f"Wrote {args.n} images ({args.size}x{args.size}) to {args.out} (labels: {labels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
