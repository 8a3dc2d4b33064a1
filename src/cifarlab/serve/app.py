"""The ASGI app: ``create_app(settings)`` builds a FastAPI app around one run folder.

Routes: the page (``/``, ``/static/*``), the REST API (``/v1/*``), the KServe Open Inference
Protocol v2 (``/v2/*``), Prometheus metrics (``/metrics``) and the OpenAPI schema
(``/openapi.json``). Every error is JSON: ``{"error": {"status": 415, "message": "..."}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifarlab import __version__
from cifarlab.errors import CifarlabError
from cifarlab.imaging import (
    IMAGE_FORMATS,
    CorruptImage,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
)
from cifarlab.serve.batching import LRUCache, MicroBatcher, QueueFull
from cifarlab.serve.metrics import Metrics
from cifarlab.serve.model import ServedModel, load_served_model

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["ServeSettings", "app_from_env", "create_app"]

log = logging.getLogger(__name__)
STATIC = resources.files("cifarlab.serve") / "static"
ENV_SETTINGS = "CIFARLAB_SERVE_SETTINGS"


@dataclass
class ServeSettings:
    run: str  # run folder served at start-up
    runs_root: str | None = None  # /v1/reload may load run folders under here; default: run's parent
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    cache_size: int = 10_000  # predictions kept, least recently used evicted
    max_upload_bytes: int = 10 * 2**20  # per request, enforced while the body streams in
    max_files: int = 64  # per request
    max_pixels: int = 40_000_000  # per image, from its header, before decoding
    precision: str = "fp32"
    tta: int = 0
    history: int = 8  # recent predictions shown on the page


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: settings come from the env."""
    return create_app(ServeSettings(**json.loads(os.environ[ENV_SETTINGS])))


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 while they stream in: from the
    Content-Length header when there is one, else by counting chunks, so an oversized upload is
    never spooled to disk."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = _error_body(413, _too_large_message(self.max_bytes))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1)


class ReloadRequest(BaseModel):
    run: str


class _State:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model: ServedModel | None = None
        self.reload: dict[str, Any] = {"state": "idle"}
        self.recent: deque[dict[str, Any]] = deque(maxlen=settings.history)
        self.tasks: set[asyncio.Task[None]] = set()  # background reloads (kept referenced)
        self.cache = LRUCache(settings.cache_size)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(settings.max_batch, settings.max_wait_ms / 1000,
                                    settings.max_queue, on_batch=self.metrics.observe_batch,
                                    on_forward=self.metrics.observe_forward)
        root = settings.runs_root or str(Path(settings.run).resolve().parent)
        self.runs_root = Path(root).resolve()

    def set_model(self, model: ServedModel) -> None:
        self.model = model  # one reference swap: requests already queued keep the old one
        self.metrics.set_model(model.name, model.version)


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app. The model loads in the background at start-up; ``/v2/health/ready`` is
    false until it is in."""
    state = _State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        loader = asyncio.create_task(_load(state, settings.run))
        try:
            yield
        finally:
            loader.cancel()
            await state.batcher.stop()

    app = FastAPI(title="cifarlab", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load assets from a CDN
                  description="Image classification with a cifarlab run folder.")
    app.state.cifarlab = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(state.metrics.middleware_class())
    app.add_middleware(PredictEndpoint, state=state)  # added last: runs first
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"Invalid request: {where}: {first.get('msg', 'invalid')}.")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"Internal error ({type(exc).__name__}); the server keeps running.")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/v1/model", summary="The served model: name, version, classes, accuracy")
    async def model_info() -> dict[str, Any]:
        m = _ready_model(state)
        return {"name": m.name, "version": m.version, **m.info, "precision": m.precision,
                "tta": m.tta, "recent": list(state.recent)}

    @app.post("/v1/predict", summary="Classify one or many uploaded images (multipart)",
              openapi_extra=_PREDICT_OPENAPI)
    async def predict(request: Request) -> Response:
        # Normally answered by PredictEndpoint before routing; this route documents the
        # endpoint in the OpenAPI schema and answers if the app is wrapped differently.
        payload = await predict_payload(state, request.headers.get("content-type", ""),
                                        await request.body(), request.url.query)
        return Response(payload, media_type="application/json")

    @app.post("/v1/reload", status_code=202, summary="Load a run folder and swap it in")
    async def reload(body: ReloadRequest) -> dict[str, Any]:
        path = (state.runs_root / body.run).resolve() if not Path(body.run).is_absolute() \
            else Path(body.run).resolve()
        if not path.is_relative_to(state.runs_root):
            raise ApiError(403, f"{body.run}: only run folders under {state.runs_root} can be "
                                "loaded (`cifarlab serve --runs-root`).")
        if state.reload["state"] == "loading":
            raise ApiError(409, "A reload is already in progress.")
        state.reload = {"state": "loading", "run": str(path)}
        state.tasks.add(task := asyncio.create_task(_load(state, str(path))))
        task.add_done_callback(state.tasks.discard)
        return state.reload

    @app.get("/v1/reload", summary="State of the last reload")
    async def reload_status() -> dict[str, Any]:
        return state.reload

    # ------------------------------------------------------ KServe Open Inference Protocol v2

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = state.model is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str) -> dict[str, Any]:
        m = _v2_model(state, name)
        s = m.image_size
        return {"name": m.name, "versions": [m.version], "platform": "pytorch",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, s, s, 3]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32",
                             "shape": [-1, len(m.classes)]}],
                "parameters": {"classes": m.classes, "input_layout": "NHWC, RGB, 0-255"}}

    @app.get("/v2/models/{name}/ready")
    async def v2_ready(name: str) -> dict[str, Any]:
        _v2_model(state, name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, body: InferRequest) -> dict[str, Any]:
        m = _v2_model(state, name)
        x = _v2_input(body, m.image_size)
        try:
            probs = await asyncio.gather(*(state.batcher.submit(img, m) for img in x))
        except QueueFull as exc:
            raise ApiError(503, f"Server busy: {exc}; retry shortly.") from None
        out = np.stack(probs).astype(np.float32)
        resp: dict[str, Any] = {"model_name": m.name, "model_version": m.version,
                                "outputs": [{"name": "probabilities", "datatype": "FP32",
                                             "shape": list(out.shape),
                                             "data": out.ravel().tolist()}]}
        if body.id is not None:
            resp["id"] = body.id
        return resp

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        state.metrics.queue_depth.set(state.batcher.depth)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"status": status, "message": message}}).encode()


def _too_large_message(max_bytes: int) -> str:
    return (f"Request body is larger than the {max_bytes / 2**20:g} MiB upload limit; send "
            "smaller or fewer images (the limit is `cifarlab serve --max-upload-mb`).")


_PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": "top_k", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                    "description": "classes per image (default 5, or fewer classes)"}],
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "properties": {"file": {"type": "array", "items": {"type": "string",
                                                             "format": "binary"}}},
    }}}},
}


async def _load(state: _State, path: str) -> None:
    s = state.settings
    try:
        # on the forward thread (see MicroBatcher.run); requests queued meanwhile wait for it
        model = await state.batcher.run(load_served_model, path, s.precision, s.tta)
    except CifarlabError as exc:
        state.reload = {"state": "failed", "run": path, "error": str(exc)}
        log.error("cannot load %s: %s", path, exc)
        return
    except Exception as exc:
        state.reload = {"state": "failed", "run": path, "error": f"{type(exc).__name__}: {exc}"}
        log.exception("cannot load %s", path)
        return
    state.set_model(model)
    state.reload = {"state": "loaded", "run": path, "version": model.version}


def _ready_model(state: _State) -> ServedModel:
    if state.model is None:
        raise ApiError(503, "The model is still loading; retry shortly (see /v2/health/ready).")
    return state.model


def _v2_model(state: _State, name: str) -> ServedModel:
    m = _ready_model(state)
    if name != m.name:
        raise ApiError(404, f"Unknown model {name!r}; this server serves {m.name!r}.")
    return m


def _v2_input(body: InferRequest, size: int) -> np.ndarray:
    inp = body.inputs[0]
    if len(body.inputs) != 1:
        raise ApiError(400, "Send exactly one input tensor, named 'input'.")
    if inp.datatype != "FP32":
        raise ApiError(400, f"inputs[0].datatype must be FP32, got {inp.datatype!r}.")
    if len(inp.shape) != 4 or inp.shape[1:] != [size, size, 3] or inp.shape[0] < 1:
        raise ApiError(400, f"inputs[0].shape must be [N, {size}, {size}, 3] (NHWC, RGB), "
                            f"got {inp.shape}.")
    n = inp.shape[0]
    try:
        flat = np.asarray(inp.data, dtype=np.float32).ravel()
    except (TypeError, ValueError):
        raise ApiError(400, "inputs[0].data must be a flat list of numbers.") from None
    if flat.size != n * size * size * 3:
        raise ApiError(400, f"inputs[0].data has {flat.size} values; shape {inp.shape} needs "
                            f"{n * size * size * 3}.")
    if not np.isfinite(flat).all() or flat.min() < 0 or flat.max() > 255:
        raise ApiError(400, "inputs[0].data must be pixel values in [0, 255].")
    return np.rint(flat).astype(np.uint8).reshape(n, size, size, 3)


def _parse_uploads(content_type: str, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
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


async def predict_payload(state: _State, content_type: str, body: bytes, query: str) -> bytes:
    """The JSON body answering POST /v1/predict (raises :class:`ApiError`)."""
    t0 = time.perf_counter()
    model = _ready_model(state)
    top_k = min(5, len(model.classes))
    raw_k = parse_qs(query).get("top_k")
    if raw_k:
        try:
            top_k = int(raw_k[-1])
        except ValueError:
            raise ApiError(422, f"top_k must be an integer, got {raw_k[-1]!r}.") from None
        if not 1 <= top_k <= len(model.classes):
            raise ApiError(422, f"top_k must be between 1 and {len(model.classes)}, got {top_k}.")
    uploads = _parse_uploads(content_type, body, state.settings.max_files)
    t_read = time.perf_counter()
    results = await asyncio.gather(*(_predict_one(state, model, name, data, top_k)
                                     for name, data in uploads))
    t_end = time.perf_counter()
    for r in results:
        state.recent.appendleft({"filename": r["filename"], "top": r["top"][:1],
                                 "cached": r["cached"]})
    return json.dumps({
        "model": model.name, "version": model.version, "predictions": results,
        "timing": {"total_ms": round((t_end - t0) * 1000, 3),
                   "read_ms": round((t_read - t0) * 1000, 3),
                   "predict_ms": round((t_end - t_read) * 1000, 3)},
    }).encode()


class PredictEndpoint:
    """``POST /v1/predict`` answered in front of FastAPI's routing, dependency injection and
    response validation: on a 2-core machine that machinery cost about half of the event loop's
    time per request, time the forward pass then lost. Same body limit, same JSON errors, same
    metrics as every other route."""

    def __init__(self, app: ASGIApp, state: _State):
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
        try:
            body = await self._body(headers, receive)
            payload = await predict_payload(self.state, headers.get(b"content-type", b"").decode(
                "latin-1"), body, scope.get("query_string", b"").decode("latin-1"))
            status = 200
        except _TooLarge:
            status, close = 413, True
            payload = _error_body(413, _too_large_message(self.max_bytes))
        except ApiError as exc:
            status, payload = exc.status, _error_body(exc.status, exc.message)
        except Exception as exc:
            log.exception("unhandled error on /v1/predict")
            status = 500
            payload = _error_body(500, f"Internal error ({type(exc).__name__}); the server "
                                       "keeps running.")
        head = [(b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode())]
        if close:
            head.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": payload})
        m = self.state.metrics
        m.requests.labels("/v1/predict", "POST", str(status)).inc()
        m.latency.labels("/v1/predict").observe(time.perf_counter() - t0)

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _TooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "The client closed the connection mid-upload.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


INLINE_PIXELS = 256 * 256  # decoded on the event loop: well under a millisecond


async def _decode(data: bytes, size: int, name: str, max_pixels: int) -> np.ndarray:
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


async def _predict_one(state: _State, model: ServedModel, name: str, data: bytes,
                       top_k: int) -> dict[str, Any]:
    sha = hashlib.sha256(data).hexdigest()
    key = (sha, model.version)
    probs = state.cache.get(key)
    cached = probs is not None
    state.metrics.cache(cached)
    if probs is None:
        if not data:
            raise ApiError(422, f"{name}: the file is empty.")
        try:
            image = await _decode(data, model.image_size, name, state.settings.max_pixels)
        except UnsupportedImage as exc:
            raise ApiError(415, str(exc)) from None
        except ImageTooLarge as exc:
            raise ApiError(413, str(exc)) from None
        except CorruptImage as exc:
            raise ApiError(422, str(exc)) from None
        try:
            probs = await state.batcher.submit(image, model)
        except QueueFull as exc:
            raise ApiError(503, f"Server busy: {exc}; retry shortly.") from None
        state.cache.put(key, probs)
    order = np.argsort(-probs)[:top_k]
    return {"filename": name, "sha256": sha, "cached": cached,
            "top": [{"class": model.classes[i], "probability": round(float(probs[i]), 6)}
                    for i in order]}


def settings_json(settings: ServeSettings) -> str:
    return json.dumps(asdict(settings))
