"""Uploads: the file parts of a multipart body, and decoding them with the pixel limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from cifarlab.imaging import IMAGE_FORMATS, ImageTooLarge, decode_image
from cifarlab.serve.errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["INLINE_PIXELS", "decode_upload", "parse_uploads"]


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
            raise ApiError(400, f"Too many parts: at most {max_files} per request.")
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


INLINE_PIXELS = 256 * 256  # decoded on the event loop: well under a millisecond


async def decode_upload(data: bytes, size: int, name: str, max_pixels: int) -> np.ndarray:
    """Decode an upload. Small images (by their header) decode on the event loop, where a
    thread hop would cost more than the decoding; larger ones on a worker thread."""
    try:
        return decode_image(data, size, name=name, max_pixels=min(max_pixels, INLINE_PIXELS),
                            formats=IMAGE_FORMATS)
    except ImageTooLarge:
        if max_pixels <= INLINE_PIXELS:
            raise
    return await run_in_threadpool(decode_image, data, size, name=name, max_pixels=max_pixels,
                                   formats=IMAGE_FORMATS)
