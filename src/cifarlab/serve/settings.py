"""The server's settings: one dataclass, passed to :func:`create_app` or, for several uvicorn
workers, through an environment variable as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["ENV_SETTINGS", "ServeSettings", "settings_from_env", "settings_json"]

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
    tta: int | None = None  # None: the run's own, the TTA its test accuracy was measured with
    history: int = 8  # recent predictions shown on the page


def settings_json(settings: ServeSettings) -> str:
    return json.dumps(asdict(settings))


def settings_from_env(environ: dict[str, str]) -> ServeSettings:
    return ServeSettings(**json.loads(environ[ENV_SETTINGS]))
