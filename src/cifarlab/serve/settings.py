"""The server's settings: one dataclass, passed to :func:`create_app` or, for several uvicorn
workers, through an environment variable as JSON. Every limit is a ``cifarlab serve`` option of
the same name (README, "Limits")."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

__all__ = ["ENV_SETTINGS", "ServeSettings", "settings_from_env", "settings_json"]

ENV_SETTINGS = "CIFARLAB_SERVE_SETTINGS"
MiB = 2**20


@dataclass
class ServeSettings:
    run: str  # run folder served at start-up
    runs_root: str | None = None  # /v1/reload may load run folders under here; default: run's parent
    model_name: str | None = None  # the name clients use (KServe v2); default: the run's model
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 1024  # images waiting; also the most images one request may carry
    cache_size: int = 10_000  # predictions kept, least recently used evicted
    max_upload_bytes: int = 10 * MiB  # per request, enforced while the body streams in
    max_inflight_upload_bytes: int = 256 * MiB  # all request bodies held at once
    max_files: int = 64  # per request
    max_pixels: int = 40_000_000  # per image, from its header, before decoding
    max_decode_bytes: int = 512 * MiB  # decoding and v2 JSON parsing, all requests at once
    max_request_decode_bytes: int = 256 * MiB  # the same, one request's images together
    decode_threads: int = 0  # 0: one per core
    precision: str = "fp32"
    tta: int | None = None  # None: the run's own, the TTA its test accuracy was measured with
    admin_token: str | None = None  # POST /v1/reload is off unless set
    state_dir: str | None = None  # shared by several workers: reloads reach every one
    # the HTTP layer (cifarlab.serve.protocol; uvicorn's own settings for the rest)
    max_header_bytes: int = 16 * 2**10
    max_headers: int = 100
    header_timeout: float = 10.0
    keep_alive: float = 5.0
    max_connections: int = 1024

    def decode_workers(self) -> int:
        return self.decode_threads or os.cpu_count() or 1


def settings_json(settings: ServeSettings) -> str:
    return json.dumps(asdict(settings))


def settings_from_env(environ: dict[str, str]) -> ServeSettings:
    return ServeSettings(**json.loads(environ[ENV_SETTINGS]))
