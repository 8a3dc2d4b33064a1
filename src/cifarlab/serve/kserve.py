"""The KServe Open Inference Protocol v2: health, model metadata and ``infer`` with an FP32
tensor ``[N, H, W, 3]`` (NHWC, RGB, 0-255), answered with an FP32 ``probabilities`` tensor."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cifarlab.infer import Predictor
from cifarlab.serve.batching import QueueFull
from cifarlab.serve.errors import ApiError
from cifarlab.serve.state import ServerState

__all__ = ["InferInput", "InferRequest", "kserve_router"]


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1)


def kserve_router(state: ServerState) -> APIRouter:
    """The ``/v2`` routes over the server's shared state."""
    router = APIRouter()

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = state.model is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/v2/models/{name}")
    async def v2_metadata(name: str) -> dict[str, Any]:
        m = _v2_model(state, name)
        s = m.image_size
        return {"name": m.name, "versions": [m.version], "platform": "pytorch",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, s, s, 3]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32",
                             "shape": [-1, len(m.classes)]}],
                "parameters": {"classes": m.classes, "input_layout": "NHWC, RGB, 0-255"}}

    @router.get("/v2/models/{name}/ready")
    async def v2_ready(name: str) -> dict[str, Any]:
        _v2_model(state, name)
        return {"name": name, "ready": True}

    @router.post("/v2/models/{name}/infer")
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

    return router


def _v2_model(state: ServerState, name: str) -> Predictor:
    m = state.ready_model()
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
