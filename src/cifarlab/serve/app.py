"""The ASGI app: ``create_app(settings)`` builds a FastAPI app around one run folder.

Routes: the page (``/``, ``/static/*``), the REST API (``/v1/*``, with ``/v1/predict`` answered
by :class:`~cifarlab.serve.predict.PredictEndpoint` ahead of routing), the KServe Open Inference
Protocol v2 (``/v2``, ``/v2/*``, :mod:`.kserve`), Prometheus metrics (``/metrics``) and the
OpenAPI schema (``/openapi.json``). Every error, from every route, is JSON in one shape:
``{"error": "<message>", "status": 415}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifarlab import __version__
from cifarlab.serve.errors import ApiError, error_response, error_responses
from cifarlab.serve.kserve import JsonParser, kserve_router
from cifarlab.serve.limits import BodyBudget, BodyLimit, PathGuard
from cifarlab.serve.predict import PREDICT_OPENAPI, PredictEndpoint, predict_payload
from cifarlab.serve.reload import Reloads
from cifarlab.serve.settings import ServeSettings, settings_from_env
from cifarlab.serve.state import ServerState

__all__ = ["ServeSettings", "app_from_env", "create_app"]

log = logging.getLogger(__name__)
STATIC = resources.files("cifarlab.serve") / "static"


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: settings come from the env."""
    return create_app(settings_from_env(dict(os.environ)))


class ReloadRequest(BaseModel):
    run: str = Field(description="a run folder's name under the server's runs root")


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app. With one worker the model loads in the background at start-up and
    ``/v2/health/ready`` is false until it is in; with several (``state_dir`` set) each worker
    loads it before it accepts a connection."""
    state = ServerState(settings)
    reloads = Reloads(state)
    parser = JsonParser()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        loader = asyncio.create_task(reloads.start())
        if settings.state_dir is not None:
            # Several workers share one socket, so a worker that accepted connections before its
            # model is in would answer 503 while its siblings are ready (and /v2/health/ready,
            # answered by whichever worker, would not tell). It accepts nothing until loaded.
            await asyncio.shield(loader)
        try:
            yield
        finally:
            loader.cancel()
            await reloads.stop()
            await state.batcher.stop()
            state.decoder.close()
            parser.close()

    app = FastAPI(title="cifarlab", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load assets from a CDN
                  description="Image classification with a cifarlab run folder. Every error "
                              "is `{\"error\": \"<message>\", \"status\": <code>}`. Besides "
                              "the responses listed per route, any request can get 400 (a "
                              "malformed request line or path), 404 (no such route), 405 "
                              "(method not allowed), 408 (headers slower than "
                              "`--header-timeout`), 431 (headers over `--max-header-kb` or "
                              "`--max-headers`) and 503 (over `--max-connections`).")
    app.state.cifarlab = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(state.metrics.middleware_class())
    app.add_middleware(PredictEndpoint, state=state)
    app.add_middleware(BodyBudget, budget=state.uploads,
                       max_bytes=settings.max_upload_bytes)
    app.add_middleware(PathGuard)  # added last: runs first
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(ApiError)
    async def apierror_response(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"No route {request.url.path!r}; see /openapi.json.",
                   405: f"{request.method} is not allowed on {request.url.path!r}; see "
                        "/openapi.json."}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON.")
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, f"Invalid request: {where}: {first.get('msg', 'invalid')}.")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"Internal error ({type(exc).__name__}); the server keeps running.")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/v1/model", summary="The served model: name, version, classes, accuracy",
             responses=error_responses(503))
    async def model_info() -> dict[str, Any]:
        m = state.ready_model()
        return {"name": m.name, "served_name": state.served_name, "version": m.version,
                **m.info, "precision": m.precision,
                "limits": {"max_upload_mb": settings.max_upload_bytes / 2**20,
                           "max_files": settings.max_files, "max_pixels": settings.max_pixels,
                           "max_images": settings.max_queue}}

    @app.post("/v1/predict", summary="Classify one or many uploaded images (multipart)",
              openapi_extra=PREDICT_OPENAPI,
              responses=error_responses(400, 413, 415, 422, 503))
    async def predict(request: Request) -> Response:
        # Normally answered by PredictEndpoint before routing; this route documents the
        # endpoint in the OpenAPI schema and answers if the app is wrapped differently.
        payload = await predict_payload(state, request.headers.get("content-type", ""),
                                        await request.body(), request.url.query)
        return Response(payload, media_type="application/json")

    def admin(request: Request) -> None:
        token = settings.admin_token
        if not token:
            raise ApiError(403, "Reloading is off on this server; start it with "
                                "`cifarlab serve --admin-token TOKEN` to allow it.")
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer "):
            raise ApiError(401, "Send the admin token: `Authorization: Bearer TOKEN`.",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            raise ApiError(403, "Wrong admin token.")

    @app.post("/v1/reload", status_code=202,
              summary="Load a run folder and swap it in (every worker); needs the admin token",
              responses=error_responses(400, 401, 403, 409, 422),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ReloadRequest.model_json_schema()}}}})
    async def reload(request: Request) -> JSONResponse:
        admin(request)  # before the body is even read
        try:
            doc = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, 'The body must be JSON: {"run": "<run folder name>"}.') from None
        if not isinstance(doc, dict) or not isinstance(doc.get("run"), str):
            raise ApiError(422, 'The body must be {"run": "<run folder name>"}.')
        return JSONResponse(await reloads.request(doc["run"]), status_code=202)

    @app.get("/v1/reload", summary="State of the last reload, over every worker")
    async def reload_status() -> dict[str, Any]:
        return reloads.status()

    app.include_router(kserve_router(state, parser))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        state.metrics.queue_depth.set(state.batcher.depth)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
