from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cifarlab.errors import DataError
from cifarlab.imaging import BACKGROUND, decode_image
from helpers import png_bytes


def test_grayscale_becomes_rgb():
    img = Image.fromarray(np.full((32, 32), 77, np.uint8))
    out = decode_image(png_bytes(img))
    assert out.shape == (32, 32, 3) and (out == 77).all()


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((32, 32), 65535 // 2, np.uint16)
    arr[0, 0] = 65535
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = decode_image(png_bytes(img))
    assert out[1, 1, 0] in (127, 128)  # clipping would give 255
    assert out[0, 0, 0] == 255


def test_rgba_is_composited_on_the_background():
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:16, :, 3] = 255  # top half opaque, bottom half transparent
    out = decode_image(png_bytes(Image.fromarray(arr)))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[31, 0]) == BACKGROUND


def test_la_and_palette_with_transparency():
    la = Image.merge("LA", [Image.new("L", (32, 32), 10), Image.new("L", (32, 32), 0)])
    assert tuple(decode_image(png_bytes(la))[5, 5]) == BACKGROUND
    p = Image.new("P", (32, 32), 0)
    p.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 16, 32))
    p.info["transparency"] = 0
    out = decode_image(png_bytes(p, transparency=0))
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 31]) == BACKGROUND


def test_cmyk_jpeg_is_converted():
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(png_bytes(img, "JPEG", quality=95))
    r, g, b = out[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, wide image
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_image(png_bytes(img, "JPEG", exif=exif, quality=95), size=None)
    assert out.shape == (40, 20, 3)  # now tall
    assert out[5, 10].mean() > 200 and out[35, 10].mean() < 50


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(data)
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_resize_center_crops_to_square():
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, 32:96] = 200  # the center square is bright, the sides dark
    out = decode_image(png_bytes(Image.fromarray(arr)), size=32)
    assert out.shape == (32, 32, 3) and out.mean() > 190


def test_bad_inputs_are_named():
    with pytest.raises(DataError, match="upload.*not a readable image"):
        decode_image(b"hello world")
    data = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(DataError, match="photo.png.*corrupt or truncated"):
        decode_image(data[: len(data) // 2], name="photo.png")
    with pytest.raises(DataError, match="exceeds the limit"):
        decode_image(data, max_pixels=100)
