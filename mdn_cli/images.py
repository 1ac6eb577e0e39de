"""Decoding user photos: any PIL format, EXIF orientation applied, always 8-bit RGB, bombs refused."""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# 64 megapixels is far above any phone photo; PIL's own default (89 Mpx) only warns below 2x.
MAX_PIXELS = 64_000_000


class UnreadableImageError(DataError):
    """One image file cannot be decoded; the message names it."""


def load_rgb(source: str | Path | bytes, draft_size: int | None = None, name: str | None = None) -> Image.Image:
    """Open an image (a file path, or the bytes of an uploaded file) as an upright 8-bit RGB PIL image.

    Applies the EXIF orientation, flattens transparency onto white, maps 16-bit and float
    grayscale to 8 bits, converts CMYK/palette/grayscale to RGB. Raises UnreadableImageError
    (naming the file, or `name`) for missing, empty, truncated, non-image, special (FIFO, device)
    or oversized files.
    `draft_size`: let JPEG decode at a reduced scale whose shorter side stays >= this (much faster
    for large photos that are resized down anyway).
    """
    if isinstance(source, (bytes, bytearray)):
        label, opened = name or "upload", io.BytesIO(source)
    else:
        label = name or str(source)
        path = Path(source)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise UnreadableImageError(f"{label}: image file not found") from None
        except OSError as e:  # a symlink loop, a name too long, no permission
            raise UnreadableImageError(f"{label}: cannot read ({e.strerror or type(e).__name__})") from None
        if not stat.S_ISREG(mode):  # a FIFO would block the read forever; a device never ends
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
            raise UnreadableImageError(f"{label}: is {kind}, not an image file")
        opened = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImageError(
                        f"{label}: image is {width}x{height} pixels, above the {MAX_PIXELS // 1_000_000} Mpx "
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
        raise UnreadableImageError(f"{label}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImageError(f"{label}: declared image size is too large (possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError(f"{label}: not an image PIL can read (empty, corrupt or wrong format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated files, broken headers, bad EXIF
        raise UnreadableImageError(f"{label}: cannot decode image ({e})") from None


def square(image: Image.Image, size: int) -> torch.Tensor:
    """Resize an RGB image's shorter side to `size` and take the centre square: uint8 (3, S, S)."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    if new != (w, h):
        # resize straight to the crop box: one resampling pass, and only over the pixels kept
        box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
        image = image.resize((size, size), Image.BILINEAR, box=box, reducing_gap=3.0)
    else:
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def decode_square(source: str | Path | bytes, size: int, name: str | None = None) -> torch.Tensor:
    """Decode an image and take its centre square at `size`: uint8 (3, S, S). This is all the
    per-image work that does not change between epochs (what the caches keep)."""
    return square(load_rgb(source, draft_size=size, name=name), size)


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
