"""Errors the server answers with: one JSON shape for every status from every route,
``{"error": "<message>", "status": 415}``.

``error`` is a string because the KServe v2 protocol says so (its clients, ``tritonclient``
among them, print that string), and one shape everywhere means a client handles errors once.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["ApiError", "TooLarge", "error_body", "error_response", "error_responses",
           "too_large_message"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class TooLarge(Exception):
    """A request body went over the upload limit while it streamed in."""


def error_response(status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers=headers)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def too_large_message(max_bytes: int) -> str:
    return (f"Request body is larger than the {max_bytes / 2**20:g} MiB upload limit; send "
            "smaller or fewer images (the limit is `cifarlab serve --max-upload-mb`).")


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error", "status"],
    "properties": {"error": {"type": "string", "description": "what went wrong and what to do"},
                   "status": {"type": "integer", "description": "the HTTP status, repeated"}},
}

_WHY = {
    400: "Malformed request (body, tensor, path or header)",
    401: "No admin token (`Authorization: Bearer <token>`)",
    403: "Wrong admin token, or a run folder outside the runs root",
    404: "Unknown route, model or version",
    405: "Method not allowed",
    409: "A reload is already in progress",
    413: "Over a configured limit, named in the message with its `cifarlab serve` option: "
         "body (--max-upload-mb), files (--max-files), pixels per image (--max-pixels), images "
         "per request (--max-queue), decode memory (--max-decode-mb, "
         "--max-request-decode-mb)",
    415: "Not multipart/form-data, or not a supported image format",
    422: "A well-formed request with an invalid value (empty or corrupt image, top_k)",
    431: "Request headers over the size or count limit",
    503: "The model is still loading, or the queue is full; retry shortly",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, in the one error shape."""
    return {s: {"description": _WHY[s],
                "content": {"application/json": {"schema": _ERROR_SCHEMA}}} for s in statuses}

