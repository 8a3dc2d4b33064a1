"""cifarlab: tune, train, diagnose and serve image classifiers on CIFAR-10 and image folders.

Heavy imports (torch) are lazy so that ``import cifarlab`` and ``cifarlab --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "CifarlabError",
    "TrainConfig",
    "__version__",
    "create_model",
    "evaluate_run",
    "list_models",
    "load_data",
    "load_run",
    "predict_files",
    "train",
]

_LAZY = {
    "CifarlabError": "cifarlab.errors",
    "TrainConfig": "cifarlab.config",
    "create_model": "cifarlab.models",
    "list_models": "cifarlab.models",
    "load_data": "cifarlab.data",
    "train": "cifarlab.train",
    "load_run": "cifarlab.runs",
    "evaluate_run": "cifarlab.runs",
    "predict_files": "cifarlab.runs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
