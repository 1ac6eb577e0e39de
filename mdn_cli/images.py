"""Decoding user photos: any PIL format, EXIF orientation applied, always 8-bit RGB, bombs refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# 64 megapixels is far above any phone photo; PIL's own default (89 Mpx) only warns below 2x.
MAX_PIXELS = 64_000_000


class UnreadableImageError(DataError):
    """One image file cannot be decoded; the message names it."""


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image file as an upright 8-bit RGB PIL image.

    Applies the EXIF orientation, flattens transparency onto white, maps 16-bit and float
    grayscale to 8 bits, converts CMYK/palette/grayscale to RGB. Raises UnreadableImageError
    (naming the file) for missing, empty, truncated, non-image or oversized files.
    `draft_size`: let JPEG decode at a reduced scale whose shorter side stays >= this (much faster
    for large photos that are resized down anyway).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImageError(
                        f"{path}: image is {width}x{height} pixels, above the {MAX_PIXELS // 1_000_000} Mpx "
                        "limit (a possible decompression bomb); resize it or remove it"
                    )
                if draft_size is not None and im.format == "JPEG":
                    scale = min(width, height) / draft_size
                    if scale >= 2:
                        im.draft("RGB", (round(width / scale), round(height / scale)))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImageError(f"{path}: declared image size is too large (possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError(f"{path}: not an image PIL can read (empty, corrupt or wrong format)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated files, broken headers, bad EXIF
        raise UnreadableImageError(f"{path}: cannot decode image ({e})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            lo, hi_ = float(a.min()), float(a.max())
            a = (a - lo) / (hi_ - lo or 1.0) * 255.0
        else:
            a = a / hi * 255.0
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
