"""``cifarlab serve``: a web page and a REST API around one run folder.

:func:`create_app` builds the FastAPI app (:mod:`.app`); the model is a
:class:`cifarlab.infer.Predictor` loaded once (:mod:`.state`); :mod:`.batching` groups
concurrent requests into one forward pass and keeps the SHA-256 prediction cache;
:mod:`.predict` answers ``/v1/predict``, :mod:`.kserve` the KServe v2 protocol (its tensors:
:mod:`.tensors`); :mod:`.uploads`, :mod:`.budget`, :mod:`.limits`, :mod:`.protocol` and
:mod:`.errors` handle what comes in and what goes wrong; :mod:`.shared` keeps several workers on
one model.

Imports are lazy: the process that parses large v2 JSON bodies imports :mod:`.tensors` alone,
without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from cifarlab.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from cifarlab.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(name)
