"""The server's shared state: what every route reads."""

from __future__ import annotations

from pathlib import Path

from cifarlab.builders import display_name
from cifarlab.infer import Predictor
from cifarlab.serve.batching import LRUCache, MicroBatcher
from cifarlab.serve.budget import ByteBudget
from cifarlab.serve.errors import ApiError
from cifarlab.serve.metrics import Metrics
from cifarlab.serve.settings import ServeSettings
from cifarlab.serve.uploads import Decoder

__all__ = ["ServerState"]


class ServerState:
    """Everything the routes share: settings, the served predictor, reload state, cache, metrics,
    the memory budgets, the decoder and the batcher."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model: Predictor | None = None
        self.served_name: str | None = settings.model_name  # fixed by the first model loaded
        self.cache = LRUCache(settings.cache_size)
        self.metrics = Metrics()
        self.uploads = ByteBudget(settings.max_inflight_upload_bytes)
        self.decoder = Decoder(settings)
        self.batcher = MicroBatcher(settings.max_batch, settings.max_wait_ms / 1000,
                                    settings.max_queue, on_batch=self.metrics.observe_batch,
                                    on_forward=self.metrics.observe_forward,
                                    fair_share=min(4, settings.max_batch))
        root = settings.runs_root or str(Path(settings.run).resolve().parent)
        self.runs_root = Path(root).resolve()

    def ready_model(self) -> Predictor:
        if self.model is None:
            raise ApiError(503, "The model is still loading; retry shortly (see "
                                "/v2/health/ready).")
        return self.model

    def set_model(self, model: Predictor) -> None:
        if self.served_name is None:  # the name clients use stays across reloads
            self.served_name = display_name(str(model.info.get("model") or model.name))
        self.model = model  # one reference swap: requests already queued keep the old one
        self.metrics.set_model(self.served_name, model.version)
