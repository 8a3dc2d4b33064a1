"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

With several workers (``PROMETHEUS_MULTIPROC_DIR`` set by ``cifarlab serve --workers N`` before
the workers start), every worker writes its values to that folder and ``/metrics`` sums them over
the live workers (prometheus_client's multiprocess mode): the answer does not depend on which
worker serves the scrape."""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cifarlab_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("cifarlab_request_seconds", "Request latency in seconds",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("cifarlab_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_seconds = Histogram("cifarlab_queue_seconds",
                                       "Time an image waited for its forward pass",
                                       buckets=_LATENCY, registry=r)
        self.forward_seconds = Histogram("cifarlab_forward_seconds",
                                         "Time of one batched forward pass (compute only)",
                                         buckets=_LATENCY, registry=r)
        self.cache_hits = Counter("cifarlab_cache_hits", "Predictions served from the cache",
                                  registry=r)
        self.cache_misses = Counter("cifarlab_cache_misses", "Predictions computed",
                                    registry=r)
        self.queue_depth = Gauge("cifarlab_queue_depth", "Images waiting for a forward pass",
                                 registry=r, multiprocess_mode="livesum")
        self.model_info = Gauge("cifarlab_model_info", "The served model (value 1)",
                                ["name", "version"], registry=r, multiprocess_mode="livemax")
        self._served: tuple[str, str] | None = None

    def observe_batch(self, size: int, waits: list[float]) -> None:
        self.batch_size.observe(size)
        for w in waits:
            self.queue_seconds.observe(w)

    def observe_forward(self, seconds: float) -> None:
        self.forward_seconds.observe(seconds)

    def cache(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def set_model(self, name: str, version: str) -> None:
        if self._served is not None:  # 0, not just cleared: in multiprocess mode the old
            self.model_info.labels(*self._served).set(0)  # value would stay in its file
        self.model_info.clear()
        self.model_info.labels(name, version).set(1)
        self._served = (name, version)

    def render(self) -> tuple[bytes, str]:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=folder)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware_class(self) -> Any:
        metrics = self

        class _Timing:
            """Counts requests by route template (not raw path: bounded label values)."""

            def __init__(self, app: ASGIApp):
                self.app = app

            async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
                if scope["type"] != "http":
                    await self.app(scope, receive, send)
                    return
                t0 = time.perf_counter()
                status = 500

                async def send_status(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                try:
                    await self.app(scope, receive, send_status)
                finally:
                    route = scope.get("route")
                    path = getattr(route, "path", None) or "unmatched"
                    if path.startswith("/static"):
                        path = "/static"
                    metrics.requests.labels(path, scope["method"], str(status)).inc()
                    metrics.latency.labels(path).observe(time.perf_counter() - t0)

        return _Timing
