"""The KServe Open Inference Protocol v2, as ``tritonclient[http]`` speaks it.

- ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``.
- ``GET /v2/models/{name}[/versions/{version}]`` (metadata), ``.../ready``, ``POST .../infer``.
  The name is stable across reloads (``--model-name``, default the run's model); the version is
  the served weights' (the first 12 hex digits of their SHA-256), and a reload changes it.
- Inputs, one of:
  - ``image``: ``BYTES [N]``, encoded image files (PNG, JPEG, WebP, BMP, GIF), preprocessed by
    the server exactly as ``/v1/predict`` does. The simplest way to get the same answer.
  - ``input``: ``[N, S, S, 3]`` pixels, NHWC, RGB, values 0..255 in any numeric datatype
    (``FP32`` as in the metadata, or ``UINT8``: 4× smaller). They must already be preprocessed
    as the server would: center-cropped to a square, then resized to S×S with Lanczos (Pillow's
    ``resize(..., LANCZOS, reducing_gap=3)``); the metadata's ``parameters`` say so.
- Outputs: ``probabilities`` (``FP32 [N, C]``, classes in the metadata's order) and ``label``
  (``BYTES [N]``, the top class).
- JSON tensors or the binary tensor extension, with or without a Content-Type, gzip or deflate
  bodies; errors are ``{"error": "<message>"}`` (plus ``status``), as the protocol specifies.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cifarlab import __version__
from cifarlab.infer import Predictor
from cifarlab.serve.errors import ApiError, error_responses
from cifarlab.serve.predict import check_count, submit
from cifarlab.serve.state import ServerState
from cifarlab.serve.tensors import (
    Output,
    V2Request,
    decompress,
    encode_response,
    parse_request,
    parse_request_values,
    split_body,
)

__all__ = ["JsonParser", "kserve_router"]

PIXEL_TYPES = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                         "INT64", "FP16", "FP32", "FP64"})
INLINE_JSON = 256 * 2**10  # larger JSON headers are parsed in a separate process
JSON_COST = 10  # peak bytes of memory per byte of JSON parsed (measured: 7.4)


class JsonParser:
    """Parses large v2 JSON bodies in one separate process: ``json.loads`` holds the GIL for its
    whole run (about 200 ms for a 10 MiB body), so on a thread it would stall the event loop
    and every other client; in a process the loop stays free. The parse holds
    ``JSON_COST`` × its size of the decode budget."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawn: never fork a process that runs torch threads
            # niced: on a small CPU the forward pass keeps its cores while a body parses
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=os.nice, initargs=(10,))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    async def parse(self, state: ServerState, header: bytes, binary: bytes) -> V2Request:
        if len(header) <= INLINE_JSON:
            return parse_request(header, binary)
        async with state.decoder.budget.hold(min(len(header) * JSON_COST + len(binary),
                                                 state.decoder.budget.capacity)):
            loop = asyncio.get_running_loop()
            req, status, message = await loop.run_in_executor(
                self._get_pool(), parse_request_values, header, binary)
        if req is None:
            raise ApiError(status, message)
        return req


def kserve_router(state: ServerState, parser: JsonParser) -> APIRouter:
    """The ``/v2`` routes over the server's shared state."""
    router = APIRouter(tags=["KServe v2"])

    @router.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cifarlab", "version": __version__,
                "extensions": ["binary_tensor_data"]}

    @router.get("/v2/health/live", summary="Liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready", summary="Readiness: 503 until the model is loaded",
                responses=error_responses(503))
    async def ready() -> JSONResponse:
        ok = state.model is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    errors_get = error_responses(404, 503)

    @router.get("/v2/models/{name}", summary="Model metadata", responses=errors_get)
    @router.get("/v2/models/{name}/versions/{version}", summary="Model metadata",
                responses=errors_get)
    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return _metadata(state, _model(state, name, version))

    @router.get("/v2/models/{name}/ready", summary="Model readiness", responses=errors_get)
    @router.get("/v2/models/{name}/versions/{version}/ready", summary="Model readiness",
                responses=errors_get)
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        m = _model(state, name, version)
        return {"name": state.served_name, "version": m.version, "ready": True}

    errors_infer = error_responses(400, 404, 413, 415, 422, 503)
    infer_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "binary tensor extension: the JSON header "
                                                    "(Inference-Header-Content-Length bytes), "
                                                    "then the tensors' bytes"}}}}

    @router.post("/v2/models/{name}/infer", summary="Inference", responses=errors_infer,
                 openapi_extra=infer_doc)
    @router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference",
                 responses=errors_infer, openapi_extra=infer_doc)
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        m = _model(state, name, version)
        body = decompress(await request.body(), request.headers.get("content-encoding", ""),
                          state.settings.max_upload_bytes)
        header, binary = split_body(body, request.headers.get("inference-header-content-length"))
        req = await parser.parse(state, header, binary)
        images = await _images(state, m, req)
        probs = np.stack(await submit(state, images, m)).astype(np.float32)
        outputs = _outputs(m, req, probs)
        binary_names = ({n for n, b in req.outputs if b} if req.outputs is not None
                        else {o.name for o in outputs} if req.binary_output else set())
        payload, header_length = encode_response(state.served_name or m.name, m.version, req.id,
                                                 outputs, binary_names)
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    return router


def _model(state: ServerState, name: str, version: str | None) -> Predictor:
    m = state.ready_model()
    if name != state.served_name:
        raise ApiError(404, f"Unknown model {name!r}; this server serves "
                            f"{state.served_name!r}.")
    if version not in (None, "", m.version):
        raise ApiError(404, f"Model {name!r} has no version {version!r}; it serves version "
                            f"{m.version!r} (GET /v2/models/{name}).")
    return m


def _metadata(state: ServerState, m: Predictor) -> dict[str, Any]:
    s = m.image_size
    return {
        "name": state.served_name, "versions": [m.version], "platform": "pytorch_cifarlab",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, s, s, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(m.classes)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "classes": m.classes,
            "image": "BYTES: encoded image files (PNG, JPEG, WebP, BMP, GIF; base64 strings "
                     "in JSON, raw bytes with the binary extension), preprocessed by the "
                     "server exactly as POST /v1/predict does",
            "input": f"NHWC, RGB, values 0..255 in any numeric datatype. Preprocess as the "
                     f"server does, or answers differ from /v1/predict: decode to RGB, "
                     f"center-crop to a square, resize to {s}x{s} with Lanczos (Pillow "
                     f"Image.resize(({s}, {s}), LANCZOS, reducing_gap=3.0)), no normalisation "
                     f"(the model normalises)",
            "tta": m.tta, "precision": m.precision, "run": m.info.get("run"),
        },
    }


async def _images(state: ServerState, m: Predictor, req: V2Request) -> list[np.ndarray]:
    if len(req.inputs) != 1:
        raise ApiError(400, f"Send exactly one input, 'image' (BYTES) or 'input' (pixels); "
                            f"got {sorted(req.inputs)}.")
    (name, value), = req.inputs.items()
    datatype = req.datatypes[name]
    s = m.image_size
    if name == "image":
        if datatype != "BYTES":
            raise ApiError(400, f"Input 'image' must be BYTES (encoded image files), got "
                                f"{datatype}.")
        files = [(f"image[{i}]", bytes(v)) for i, v in enumerate(value.ravel())]
        check_count(state, len(files))
        costs = state.decoder.estimate(files, s)
        return list(await asyncio.gather(*(state.decoder.decode(data, s, n, c)
                                            for (n, data), c in zip(files, costs, strict=True))))
    if name != "input":
        raise ApiError(400, f"Unknown input {name!r}; send 'image' (BYTES) or 'input' "
                            f"([N, {s}, {s}, 3] pixels).")
    if datatype not in PIXEL_TYPES:
        raise ApiError(400, f"Input 'input' must be numeric pixels, got {datatype}.")
    if value.ndim != 4 or value.shape[1:] != (s, s, 3) or value.shape[0] < 1:
        raise ApiError(400, f"Input 'input' must have shape [N, {s}, {s}, 3] (NHWC, RGB, "
                            f"preprocessed as the metadata says), got {list(value.shape)}.")
    if not np.isfinite(value).all() or value.min() < 0 or value.max() > 255:
        raise ApiError(400, "Input 'input' must hold pixel values in [0, 255].")
    pixels = np.rint(value).astype(np.uint8) if value.dtype.kind == "f" else value.astype(np.uint8)
    return list(pixels)


def _outputs(m: Predictor, req: V2Request, probs: np.ndarray) -> list[Output]:
    labels = np.empty(len(probs), dtype=object)
    labels[:] = [m.classes[i].encode() for i in probs.argmax(1)]
    every = {"probabilities": Output("probabilities", "FP32", probs),
             "label": Output("label", "BYTES", labels)}
    if req.outputs is None:
        return list(every.values())
    unknown = [n for n, _ in req.outputs if n not in every]
    if unknown:
        raise ApiError(400, f"Unknown output(s) {unknown}; this model has 'probabilities' and "
                            "'label'.")
    return [every[n] for n, _ in req.outputs]
