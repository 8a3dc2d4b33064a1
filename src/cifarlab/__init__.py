"""cifarlab: tune, train, diagnose and serve image classifiers on CIFAR-10 and image folders.

Heavy imports (torch) are lazy so that ``import cifarlab`` and ``cifarlab --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CifarlabError",
    "Predictor",
    "RunWriter",
    "TrainConfig",
    "__version__",
    "create_model",
    "default_config",
    "list_models",
    "load_data",
    "load_run",
    "train",
]

# name -> module. No public name equals a submodule's name: importing cifarlab.trainer binds
# the attribute `trainer`, never `train`, so `from cifarlab import train` is always the function.
_LAZY = {
    "Callback": "cifarlab.callbacks",
    "CifarlabError": "cifarlab.errors",
    "Predictor": "cifarlab.infer",
    "RunWriter": "cifarlab.runs",
    "TrainConfig": "cifarlab.config",
    "create_model": "cifarlab.models",
    "default_config": "cifarlab.models",
    "list_models": "cifarlab.models",
    "load_data": "cifarlab.data",
    "load_run": "cifarlab.runs",
    "train": "cifarlab.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
