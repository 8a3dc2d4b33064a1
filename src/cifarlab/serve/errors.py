"""Errors the server answers with: one JSON shape, ``{"error": {"status": ..., "message": ...}}``,
for every status from every route."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

__all__ = ["ApiError", "TooLarge", "error_body", "error_response", "too_large_message"]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class TooLarge(Exception):
    """A request body went over the upload limit while it streamed in."""


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"status": status, "message": message}}).encode()


def too_large_message(max_bytes: int) -> str:
    return (f"Request body is larger than the {max_bytes / 2**20:g} MiB upload limit; send "
            "smaller or fewer images (the limit is `cifarlab serve --max-upload-mb`).")
