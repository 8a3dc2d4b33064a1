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
from typing import IO

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
    "decoded_bytes",
    "image_header",
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


def to_rgb(img: Image.Image, orient: bool = True) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB, respecting transparency and bit depth (and, with
    ``orient``, its EXIF orientation)."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if orient:
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


REDUCING_GAP = 3.0  # Pillow's two-step resize: an integer box reduction to >= 3x, then Lanczos
# what ImageOps.exif_transpose does for each EXIF orientation
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"})


def decoded_bytes(width: int, height: int, mode: str, image_format: str | None,
                  size: int | None) -> int:
    """An upper bound on the memory :func:`decode_image` allocates for an image, from its
    header: the full-size decoded buffer (after JPEG's reduced-scale decoding when ``size`` is
    set), one converted copy for modes that need one, and the small result. Measured against
    peak RSS in the tests."""
    if size is not None and image_format in ("JPEG", "MPO"):
        scale = _jpeg_scale(width, height, size)
        width, height = -(-width // scale), -(-height // scale)
    # bytes per pixel at the peak, measured with 16 Mpx images of each kind (peak RSS)
    if image_format == "WEBP":
        per_pixel = 16  # libwebp decodes to RGBA, then Pillow copies
    elif mode in _REDUCIBLE or mode.startswith("I;16"):
        per_pixel = {"L": 1, "RGB": 4, "CMYK": 4, "I": 4, "F": 4}.get(mode, 8)
        if mode.startswith("I;16"):
            per_pixel = 6  # 2 decoded + 4 as 32-bit "I", which reduce() takes
    else:
        per_pixel = 6  # "1" and "P": converted to RGB(A) at full size
    if size is None:
        per_pixel += 8  # no reduction: converted to RGB at full size
    return int(width * height * per_pixel * 1.25) + 2**20


def _jpeg_scale(width: int, height: int, size: int) -> int:
    """The DCT scale Pillow's ``draft`` picks for a requested ``3·size`` square (1, 2, 4 or 8)."""
    target = int(size * REDUCING_GAP)
    scale = min(width // target, height // target)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _shrink(img: Image.Image, size: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The center square of a large image, box-reduced by an integer factor in its own mode
    (before any conversion, so no full-size copy is made), and the box of the result that
    the Lanczos step then resizes. The same arithmetic as Pillow's
    ``resize(reducing_gap=3)`` of the cropped square, so the pixels match."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    factor = int(side / size / REDUCING_GAP) or 1
    if factor == 1:  # small: crop first, so Lanczos sees only the square
        if (w, h) != (side, side):
            img = img.crop((left, top, left + side, top + side))
        return img, (0, 0, side, side)
    if img.mode.startswith("I;16"):
        img = img.convert("I")  # 16-bit samples: reduce() takes them as 32-bit integers
    elif img.mode not in _REDUCIBLE:
        img = to_rgb(img, orient=False)  # "1", "P": no reduce() in their own mode
    small = img.reduce(factor, box=(left, top, left + side, top + side))
    return small, (0, 0, side / factor, side / factor)


def _open_checked(fp: IO[bytes], label: str, max_pixels: int,
                  formats: frozenset[str] | None) -> Image.Image:
    """Open an image lazily (header only) and check its format and size."""
    try:
        img = Image.open(fp)
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            f"{label}: not a readable image (supported: PNG, JPEG, WebP, BMP, GIF).") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{label}: image is too large to decode safely ({exc}).") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImage(f"{label}: image header is damaged ({exc}).") from exc
    if formats is not None and img.format not in formats:
        raise UnsupportedImage(
            f"{label}: {img.format} images are not accepted; use PNG, JPEG, WebP, BMP or GIF.")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{label}: {w}x{h} pixels exceeds the limit of {max_pixels} "
                            "pixels; downscale the image first.")
    if w == 0 or h == 0:
        raise CorruptImage(f"{label}: image has zero size.")
    return img


def image_header(data: bytes, size: int | None = 32, *, name: str | None = None,
                 max_pixels: int = MAX_PIXELS,
                 formats: frozenset[str] | None = None) -> tuple[int, int, int]:
    """Width, height and :func:`decoded_bytes` of an encoded image, from its header alone
    (no pixel is decoded), with the same checks and errors as :func:`decode_image`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open_checked(io.BytesIO(data), name or "<upload>", max_pixels, formats)
    w, h = img.size
    return w, h, decoded_bytes(w, h, img.mode, img.format, size)


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
            img = _open_checked(fp, label, max_pixels, formats)
            try:
                if size is not None and img.format in ("JPEG", "MPO"):
                    # decode at 1/2, 1/4 or 1/8 scale straight from the DCT when that still
                    # leaves >= 3x the target: far less memory and time for camera photos
                    img.draft(img.mode, (int(size * REDUCING_GAP),) * 2)
                img.load()
                if size is None:
                    rgb = to_rgb(img)
                else:
                    orientation = img.getexif().get(0x0112)
                    if getattr(img, "n_frames", 1) > 1:
                        img.seek(0)
                    small, box = _shrink(img, size)
                    small.info = img.info  # transparency, for to_rgb
                    rgb = to_rgb(small, orient=False)
                    if rgb.size != (size, size) or box != (0, 0, size, size):
                        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS, box=box,
                                         reducing_gap=REDUCING_GAP)
                    if orientation in _ORIENTATION:
                        # the center square commutes with every EXIF transpose, so it is
                        # applied last, to 32x32 pixels instead of the whole photo
                        rgb = rgb.transpose(_ORIENTATION[orientation])
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
