"""``POST /v1/predict``: uploads in, one prediction per image out, in the shape every interface
shares (:meth:`cifarlab.infer.Predictor.describe`), plus whether it came from the cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from starlette.types import ASGIApp, Receive, Scope, Send

from cifarlab.infer import DEFAULT_TOP_K, Predictor
from cifarlab.serve.batching import QueueFull, TooManyImages
from cifarlab.serve.errors import ApiError, TooLarge, error_body, too_large_message
from cifarlab.serve.limits import declared_too_large, limit_receive
from cifarlab.serve.state import ServerState
from cifarlab.serve.uploads import parse_uploads

__all__ = ["PREDICT_OPENAPI", "PredictEndpoint", "check_count", "predict_payload", "submit"]

log = logging.getLogger(__name__)


PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": "top_k", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                    "description": "classes per image (default 5, or fewer classes)"}],
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "properties": {"file": {"type": "array", "items": {"type": "string",
                                                             "format": "binary"}}},
    }}}},
}


async def predict_payload(state: ServerState, content_type: str, body: bytes, query: str) -> bytes:
    """The JSON body answering POST /v1/predict (raises :class:`ApiError`). The request is
    checked whole before any work: every image's header, the decode budgets and the queue."""
    t0 = time.perf_counter()
    model = state.ready_model()
    top_k = min(DEFAULT_TOP_K, len(model.classes))
    raw_k = parse_qs(query).get("top_k")
    if raw_k:
        try:
            top_k = int(raw_k[-1])
        except ValueError:
            raise ApiError(422, f"top_k must be an integer, got {raw_k[-1]!r}.") from None
        if not 1 <= top_k <= len(model.classes):
            raise ApiError(422, f"top_k must be between 1 and {len(model.classes)}, got {top_k}.")
    uploads = parse_uploads(content_type, body, state.settings.max_files)
    t_read = time.perf_counter()
    shas = [hashlib.sha256(data).hexdigest() for _, data in uploads]
    probs: list[np.ndarray | None] = [state.cache.get((sha, model.version)) for sha in shas]
    misses = [i for i, p in enumerate(probs) if p is None]
    check_count(state, len(misses))
    costs = state.decoder.estimate([uploads[i] for i in misses], model.image_size)
    images = await asyncio.gather(*(
        state.decoder.decode(uploads[i][1], model.image_size, uploads[i][0], cost)
        for i, cost in zip(misses, costs, strict=True)))
    computed = await submit(state, list(images), model)
    for i, p in zip(misses, computed, strict=True):
        probs[i] = p
        state.cache.put((shas[i], model.version), p)
    missed = set(misses)
    for i in range(len(uploads)):
        state.metrics.cache(i not in missed)
    t_end = time.perf_counter()
    results = [{**model.describe(name, sha, p, top_k), "cached": i not in missed}
               for i, ((name, _), sha, p) in enumerate(zip(uploads, shas, probs, strict=True))
               if p is not None]
    return json.dumps({
        "model": model.name, "version": model.version, "tta": model.tta, "predictions": results,
        "timing": {"total_ms": round((t_end - t0) * 1000, 3),
                   "read_ms": round((t_read - t0) * 1000, 3),
                   "predict_ms": round((t_end - t_read) * 1000, 3)},
    }).encode()


def check_count(state: ServerState, n: int) -> None:
    """413 for a request of more images than the queue holds, before any of them is decoded."""
    try:
        state.batcher.check_size(n)
    except TooManyImages as exc:
        raise ApiError(413, f"Too many images: {exc}.") from None


async def submit(state: ServerState, images: list[np.ndarray], model: Predictor) -> list[np.ndarray]:
    """Class probabilities of a request's images from the batcher, all or nothing: 413 for a
    request larger than the whole queue, 503 when it does not fit now."""
    try:
        return await state.batcher.submit_many(images, model)
    except TooManyImages as exc:
        raise ApiError(413, f"Too many images: {exc}.") from None
    except QueueFull as exc:
        raise ApiError(503, f"Server busy: {exc}; retry shortly.",
                       headers={"Retry-After": "1"}) from None


class PredictEndpoint:
    """``POST /v1/predict`` answered in front of FastAPI's routing, dependency injection and
    response validation: on a 2-core machine that machinery cost about half of the event loop's
    time per request, time the forward pass then lost. Same body limit, same JSON errors, same
    metrics as every other route."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state
        self.max_bytes = state.settings.max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] != "http" or path != "/v1/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        close = False
        extra: dict[str, str] = {}
        try:
            body = await self._body(headers, receive)
            payload = await predict_payload(self.state, headers.get(b"content-type", b"").decode(
                "latin-1"), body, scope.get("query_string", b"").decode("latin-1"))
            status = 200
        except TooLarge:
            status, close = 413, True
            payload = error_body(413, too_large_message(self.max_bytes))
        except ApiError as exc:
            status, payload = exc.status, error_body(exc.status, exc.message)
            extra = exc.headers or {}
        except Exception as exc:
            log.exception("unhandled error on /v1/predict")
            status = 500
            payload = error_body(500, f"Internal error ({type(exc).__name__}); the server "
                                       "keeps running.")
        head = [(b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode())]
        if close:
            head.append((b"connection", b"close"))
        head += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": payload})
        m = self.state.metrics
        m.requests.labels("/v1/predict", "POST", str(status)).inc()
        m.latency.labels("/v1/predict").observe(time.perf_counter() - t0)

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        if declared_too_large(headers, self.max_bytes):
            raise TooLarge
        receive = limit_receive(receive, self.max_bytes)
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "The client closed the connection mid-upload.")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
