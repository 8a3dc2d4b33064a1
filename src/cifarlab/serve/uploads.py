"""Uploads: the file parts of a multipart body, and decoding images within the memory budget."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from cifarlab.imaging import (
    IMAGE_FORMATS,
    CorruptImage,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
    image_header,
)
from cifarlab.serve.budget import ByteBudget
from cifarlab.serve.errors import ApiError
from cifarlab.serve.settings import ServeSettings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["INLINE_BYTES", "Decoder", "image_errors", "parse_uploads"]

T = TypeVar("T")
MiB = 2**20


def parse_uploads(content_type: str, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The file parts of a multipart/form-data body, as (filename, bytes), in order."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise ApiError(415, "Send images as multipart/form-data (for example "
                            "`curl -F file=@cat.jpg URL/v1/predict`).")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "Malformed upload: the multipart Content-Type has no boundary.")
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    chunks: list[bytes] = []

    def header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def part_end() -> None:
        parts.append((dict(headers), b"".join(chunks)))
        if len(parts) > max_files:
            raise ApiError(413, f"Too many parts: at most {max_files} per request "
                                "(`cifarlab serve --max-files`).")
        headers.clear()
        chunks.clear()

    callbacks: MultipartCallbacks = {
        "on_header_field": lambda d, a, b: field.extend(d[a:b]),
        "on_header_value": lambda d, a, b: value.extend(d[a:b]),
        "on_header_end": header_end,
        "on_part_data": lambda d, a, b: chunks.append(d[a:b]),
        "on_part_end": part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"Malformed multipart body ({exc}).") from None
    files = []
    for hdrs, data in parts:
        _, disposition = parse_options_header(hdrs.get(b"content-disposition", b""))
        if b"filename" in disposition:
            name = disposition[b"filename"] or disposition.get(b"name", b"file")
            files.append((name.decode("utf-8", "replace"), data))
    if not files:
        raise ApiError(422, "No file in the upload; send one or more images as file fields.")
    return files


@contextlib.contextmanager
def image_errors() -> Iterator[None]:
    """Image errors as HTTP errors: 415 not an image we take, 413 too large, 422 corrupt."""
    try:
        yield
    except UnsupportedImage as exc:
        raise ApiError(415, str(exc)) from None
    except ImageTooLarge as exc:
        raise ApiError(413, f"{str(exc).rstrip('.')} (the server's limit is `cifarlab serve "
                            "--max-pixels`).") from None
    except CorruptImage as exc:
        raise ApiError(422, str(exc)) from None


INLINE_BYTES = 2 * MiB  # decoded on the event loop (a 256x256 image: well under a millisecond)


class Decoder:
    """Decodes uploads on a pool of ``--decode-threads`` threads, each decode holding its
    estimated peak memory (:func:`cifarlab.imaging.decoded_bytes`) of the ``--max-decode-mb``
    budget; a request's images together may not estimate over ``--max-request-decode-mb``."""

    def __init__(self, settings: ServeSettings):
        self.max_pixels = settings.max_pixels
        self.request_limit = settings.max_request_decode_bytes
        self.budget = ByteBudget(settings.max_decode_bytes)
        self.pool = ThreadPoolExecutor(settings.decode_workers(),
                                       thread_name_prefix="cifarlab-decode")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def estimate(self, uploads: list[tuple[str, bytes]], size: int) -> list[int]:
        """Each upload's decode memory, from its header; refuses the request (413) before any
        pixel is decoded if one image, or all of them together, would go over a budget."""
        costs = []
        for name, data in uploads:
            if not data:
                raise ApiError(422, f"{name}: the file is empty.")
            with image_errors():
                w, h, cost = image_header(data, size, name=name, max_pixels=self.max_pixels,
                                          formats=IMAGE_FORMATS)
            if cost > self.budget.capacity:
                raise ApiError(413, f"{name}: a {w}x{h} image needs about {cost / MiB:.0f} MiB "
                                    f"to decode, over the {self.budget.capacity / MiB:g} MiB "
                                    "decode budget (`cifarlab serve --max-decode-mb`); "
                                    "downscale it first.")
            costs.append(cost)
        if sum(costs) > self.request_limit:
            raise ApiError(413, f"These {len(costs)} images need about {sum(costs) / MiB:.0f} "
                                f"MiB to decode together, over the per-request budget of "
                                f"{self.request_limit / MiB:g} MiB (`cifarlab serve "
                                "--max-request-decode-mb`); send fewer or smaller images per "
                                "request.")
        return costs

    async def decode(self, data: bytes, size: int, name: str, cost: int) -> np.ndarray:
        """Decode one upload whose :meth:`estimate` is ``cost``: small ones on the event loop,
        where a thread hop would cost more than the decoding, the rest on the pool."""
        with image_errors():
            if cost <= INLINE_BYTES:
                return decode_image(data, size, name=name, max_pixels=self.max_pixels,
                                    formats=IMAGE_FORMATS)
            return await self.run(cost, decode_image, data, size, name=name,
                                  max_pixels=self.max_pixels, formats=IMAGE_FORMATS)

    async def run(self, cost: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the decode pool once ``cost`` bytes of the decode budget are free."""
        async with self.budget.hold(min(cost, self.budget.capacity)):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
