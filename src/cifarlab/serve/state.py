"""The server's shared state, and loading a run folder into it (once, on the forward thread)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import CifarlabError
from cifarlab.infer import Predictor
from cifarlab.serve.batching import LRUCache, MicroBatcher
from cifarlab.serve.errors import ApiError
from cifarlab.serve.metrics import Metrics
from cifarlab.serve.settings import ServeSettings

__all__ = ["ServerState", "load_model"]

log = logging.getLogger(__name__)


class ServerState:
    """Everything the routes share: settings, the served predictor, reload state, cache, metrics
    and the batcher."""


    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model: Predictor | None = None
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

    def ready_model(self) -> Predictor:
        if self.model is None:
            raise ApiError(503, "The model is still loading; retry shortly (see "
                                "/v2/health/ready).")
        return self.model

    def set_model(self, model: Predictor) -> None:
        self.model = model  # one reference swap: requests already queued keep the old one
        self.metrics.set_model(model.name, model.version)


def _load_predictor(path: str, precision: str, tta: int | None) -> Predictor:
    """The run folder, loaded once, with one warm-up forward pass."""
    predictor = Predictor.from_run(path, tta=tta, precision=precision)
    predictor.probabilities(np.zeros((1, predictor.image_size, predictor.image_size, 3),
                                     np.uint8))
    return predictor


async def load_model(state: ServerState, path: str) -> None:
    """Load a run folder on the forward thread and swap it in; the outcome goes to
    ``state.reload``."""
    s = state.settings
    try:
        # on the forward thread (see MicroBatcher.run); requests queued meanwhile wait for it
        model = await state.batcher.run(_load_predictor, path, s.precision, s.tta)
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
