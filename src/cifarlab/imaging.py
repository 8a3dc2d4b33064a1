"""Image decoding shared by the data layer, ``predict`` and the server.

Every path into cifarlab turns a file into the same thing: an 8-bit RGB array of a fixed size.
Modes are converted by what they mean, not by what Pillow does by default: transparency is
composited on a fixed background, 16-bit samples are scaled (not clipped), CMYK and grayscale
become RGB, EXIF orientation is applied and animations contribute their first frame.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifarlab.errors import DataError

__all__ = [
    "BACKGROUND",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "CorruptImage",
    "ImageTooLarge",
    "UnsupportedImage",
    "decode_image",
    "fit_square",
    "to_rgb",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
MAX_PIXELS = 64_000_000  # refuse larger images from the header, before decoding
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF"})  # Pillow format names


class UnsupportedImage(DataError):
    """Not an image, or an image format cifarlab does not accept."""


class ImageTooLarge(DataError):
    """The header declares more pixels than the limit (a decompression bomb, or just huge)."""


class CorruptImage(DataError):
    """A recognised image that cannot be decoded: truncated or damaged."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB, respecting transparency and bit depth."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        # "I" is also what Pillow gives 16-bit PNGs; scale 0..65535 down to 0..255.
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr8 = (np.clip(arr, 0, top) * 255 + top // 2) // top
        return Image.fromarray(arr8.astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "L" and "transparency" in img.info:
        return to_rgb(img.convert("LA"))
    if mode != "RGB":
        return img.convert("RGB")
    return img


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then resize to ``size``×``size`` (no-op when already that size)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


def decode_image(
    source: bytes | str | Path,
    size: int | None = 32,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    formats: frozenset[str] | None = None,
) -> np.ndarray:
    """Decode one image into a ``size``×``size``×3 uint8 array (``size=None`` keeps its size).

    Raises a :class:`DataError` naming the file: :class:`UnsupportedImage` when it is not an
    image (or its format is not in ``formats``), :class:`ImageTooLarge` when its header declares
    more than ``max_pixels`` (checked before any pixel is decoded), :class:`CorruptImage` when
    it is truncated or damaged.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp)
            except UnidentifiedImageError as exc:
                raise UnsupportedImage(
                    f"{label}: not a readable image (supported: PNG, JPEG, WebP, BMP, GIF)."
                ) from exc
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageTooLarge(
                    f"{label}: image is too large to decode safely ({exc}).") from exc
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise CorruptImage(f"{label}: image header is damaged ({exc}).") from exc
            if formats is not None and img.format not in formats:
                raise UnsupportedImage(
                    f"{label}: {img.format} images are not accepted; use PNG, JPEG, WebP, BMP "
                    "or GIF.")
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLarge(
                    f"{label}: {w}x{h} pixels exceeds the limit of {max_pixels} pixels; "
                    "downscale the image first."
                )
            if w == 0 or h == 0:
                raise CorruptImage(f"{label}: image has zero size.")
            try:
                img.load()
                rgb = to_rgb(img)
                if size is not None:
                    rgb = fit_square(rgb, size)
                arr = np.asarray(rgb, dtype=np.uint8)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageTooLarge(
                    f"{label}: image is too large to decode safely ({exc}).") from exc
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise CorruptImage(f"{label}: image is corrupt or truncated ({exc}).") from exc
    finally:
        fp.close()
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - to_rgb guarantees RGB
        raise DataError(f"{label}: decoded to unexpected shape {arr.shape}.")
    return arr
