"""The ASGI app: ``create_app(settings)`` builds a FastAPI app around one run folder.

Routes: the page (``/``, ``/static/*``), the REST API (``/v1/*``, with ``/v1/predict`` answered
by :class:`~cifarlab.serve.predict.PredictEndpoint` ahead of routing), the KServe Open Inference
Protocol v2 (``/v2/*``, :mod:`.kserve`), Prometheus metrics (``/metrics``) and the OpenAPI schema
(``/openapi.json``). Every error is JSON: ``{"error": {"status": 415, "message": "..."}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from cifarlab import __version__
from cifarlab.serve.errors import ApiError, error_response
from cifarlab.serve.kserve import kserve_router
from cifarlab.serve.limits import BodyLimit
from cifarlab.serve.predict import PREDICT_OPENAPI, PredictEndpoint, predict_payload
from cifarlab.serve.settings import ServeSettings, settings_from_env
from cifarlab.serve.state import ServerState, load_model

__all__ = ["ServeSettings", "app_from_env", "create_app"]

log = logging.getLogger(__name__)
STATIC = resources.files("cifarlab.serve") / "static"


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: settings come from the env."""
    return create_app(settings_from_env(dict(os.environ)))


class ReloadRequest(BaseModel):
    run: str


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app. The model loads in the background at start-up; ``/v2/health/ready`` is
    false until it is in."""
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        loader = asyncio.create_task(load_model(state, settings.run))
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
    async def apierror_response(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def httperror_response(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, f"Invalid request: {where}: {first.get('msg', 'invalid')}.")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"Internal error ({type(exc).__name__}); the server keeps running.")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/v1/model", summary="The served model: name, version, classes, accuracy")
    async def model_info() -> dict[str, Any]:
        m = state.ready_model()
        return {"name": m.name, "version": m.version, **m.info, "precision": m.precision,
                "recent": list(state.recent)}

    @app.post("/v1/predict", summary="Classify one or many uploaded images (multipart)",
              openapi_extra=PREDICT_OPENAPI)
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
        state.tasks.add(task := asyncio.create_task(load_model(state, str(path))))
        task.add_done_callback(state.tasks.discard)
        return state.reload

    @app.get("/v1/reload", summary="State of the last reload")
    async def reload_status() -> dict[str, Any]:
        return state.reload

    app.include_router(kserve_router(state))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        state.metrics.queue_depth.set(state.batcher.depth)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
