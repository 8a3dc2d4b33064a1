"""Run folders: what a training run leaves behind, and how to read it back from its path alone.

``runs/<name>/`` holds ``config.json`` (the full :class:`TrainConfig`), ``model.safetensors``
(weights; nothing a user may load is a pickle), ``metrics.jsonl`` (one row per epoch) and
``summary.json`` (accuracies, losses, seconds, data SHA-256, classes, preprocessing, the weights'
SHA-256 and parameter count, versions). :class:`RunWriter` is the trainer callback that writes
them; every file is written atomically, so a crash never leaves a half-written run behind, and
``summary.json`` is written last: its presence marks a finished run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cifarlab import __version__
from cifarlab.builders import display_name, model_source, rebuild
from cifarlab.callbacks import Callback, TrainResult, TrainState
from cifarlab.config import TrainConfig, flatten
from cifarlab.errors import CifarlabError, RunError
from cifarlab.files import atomic_write, atomic_write_text
from cifarlab.hardware import INFERENCE_PRECISION
from cifarlab.kerasnet import KerasModule

__all__ = [
    "CONFIG",
    "METRICS",
    "SUMMARY",
    "WEIGHTS",
    "LoadedRun",
    "RunInfo",
    "RunWriter",
    "default_run_name",
    "load_run",
    "read_run",
]

CONFIG, WEIGHTS, METRICS, SUMMARY = (
    "config.json", "model.safetensors", "metrics.jsonl", "summary.json",
)
KERAS_CONFIG = "keras_model.json"  # a Keras model's own config (JSON, no code), beside CONFIG
FORMAT = "cifarlab-run-1"


def default_run_name(model: str) -> str:
    """``<model>-<timestamp>``; a file or builder model is named by its file's stem or its
    function (``nets/small.keras`` -> ``small-...``, ``nets.py:build`` -> ``build-...``)."""
    return f"{display_name(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------------- writing


class RunWriter(Callback):
    """Writes a run folder as training goes: the config at the start, the metrics after every
    epoch, the weights and the summary at the end.

    Place it after any callback whose findings belong in the summary (the doctor's monitor
    adds them to ``result.extras`` in its own ``on_train_end``). A folder that already holds a
    finished run is refused before training starts.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if (self.path / SUMMARY).exists():
            raise RunError(f"{self.path} already holds a finished run; choose another --name.")

    def on_train_start(self, state: TrainState) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, state.config.to_json() + "\n")

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        atomic_write_text(self.path / METRICS,
                          "".join(json.dumps(r) + "\n" for r in state.history))

    def on_train_end(self, state: TrainState, result: TrainResult) -> None:
        architecture = getattr(result.model, "architecture", None)
        if callable(architecture):
            atomic_write_text(self.path / KERAS_CONFIG, json.dumps(architecture()) + "\n")
        weights_sha256 = _write_weights(self.path / WEIGHTS, result.model, result.config.model)
        atomic_write_text(self.path / SUMMARY,
                          json.dumps(_summary(result, weights_sha256), indent=2) + "\n")


def _write_weights(path: Path, model: nn.Module, name: str) -> str:
    """Save the plain state dict as safetensors; returns the file's SHA-256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": name}
    digest = ""

    def write(tmp: Path) -> None:
        nonlocal digest
        save_file(state, str(tmp), metadata=meta)
        digest = _file_sha256(tmp)

    atomic_write(path, write)
    return digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _summary(result: TrainResult, weights_sha256: str) -> dict[str, Any]:
    cfg = result.config
    return {
        "model": cfg.model,
        "width": cfg.width,
        "model_source": model_source(cfg),
        "framework": "keras" if isinstance(result.model, KerasModule) else "torch",
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "weights_sha256": weights_sha256,
        "classes": result.classes,
        "preprocessing": {
            "image_size": cfg.data.image_size,
            "mean": result.mean,
            "std": result.std,
            "note": "center-crop to square, resize, scale to [0,1], subtract mean, divide by std",
        },
        "val_loss": result.val_loss,
        "val_acc": result.val_acc,
        "val_cal_loss": result.val_cal_loss,
        "test_loss": result.test_loss,
        "test_acc": result.test_acc,
        # the TTA that val/test were measured with, and the default of every inference on it
        "tta": cfg.tta,
        "test_precision": INFERENCE_PRECISION,
        "epochs_run": len(result.history),
        "train_seconds": round(result.train_seconds, 2),
        "total_seconds": round(result.total_seconds, 2),
        "stopped_early": None if result.stopped_early is None else str(result.stopped_early),
        "stop": None if result.stopped_early is None else result.stopped_early.to_dict(),
        "doctor": result.extras.get("doctor", []),
        "data_sha256": result.data_sha256,
        "data_source": result.source,
        "precision": result.precision,
        "device": result.device,
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _versions() -> dict[str, str]:
    return {
        "cifarlab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------- reading


@dataclass
class RunInfo:
    """A finished run's config and summary, read and checked without loading the weights."""

    path: Path
    config: TrainConfig
    summary: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.summary["classes"])

    @property
    def mean(self) -> list[float]:
        return list(self.summary["preprocessing"]["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.summary["preprocessing"]["std"])

    @property
    def image_size(self) -> int:
        return int(self.summary["preprocessing"]["image_size"])

    @property
    def tta(self) -> int:
        """The run's inference TTA: what its test accuracy was measured with."""
        return int(self.summary.get("tta", self.config.tta))

    @property
    def weights_sha256(self) -> str:
        """Recorded when the run was written; hashed here for runs from before that."""
        recorded = self.summary.get("weights_sha256")
        return recorded if recorded else _file_sha256(self.path / WEIGHTS)


@dataclass
class LoadedRun(RunInfo):
    model: nn.Module  # on CPU, in eval mode


def read_run(path: Path | str) -> RunInfo:
    """Check a run folder and read its config and summary (cheap: no weights are loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder. Train one with `cifarlab train`.")
    for name in (CONFIG, SUMMARY, WEIGHTS):
        if not (path / name).exists():
            raise RunError(
                f"{path}: missing {name}; the run did not finish or the folder is incomplete."
            )
    try:
        config = TrainConfig.from_dict(json.loads((path / CONFIG).read_text()))
        summary = json.loads((path / SUMMARY).read_text())
        info = RunInfo(path, config, summary)
        info.classes, info.image_size, info.mean, info.std  # noqa: B018 - checks the keys
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, CifarlabError) as exc:
        raise RunError(f"{path}: damaged {CONFIG} or {SUMMARY} ({exc}).") from exc
    return info


def load_run(path: Path | str) -> LoadedRun:
    """Rebuild a trained model from its run folder alone."""
    info = read_run(path)
    keras_config = None
    if (info.path / KERAS_CONFIG).exists():
        try:
            keras_config = json.loads((info.path / KERAS_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"{info.path / KERAS_CONFIG}: damaged ({exc}).") from None
    try:
        model = rebuild(info.config, len(info.classes), info.image_size, keras_config,
                        info.summary.get("model_source"))
    except CifarlabError as exc:
        raise RunError(f"{info.path}: cannot rebuild its model: {exc}") from None
    try:
        model.load_state_dict(load_file(str(info.path / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise RunError(f"{info.path / WEIGHTS}: cannot load weights ({exc}).") from exc
    model.eval()
    return LoadedRun(info.path, info.config, info.summary, model)


def config_differences(runs: list[RunInfo]) -> list[str]:
    """The dotted config keys whose values differ among ``runs`` (where they differ: what
    `cifarlab compare` shows next to the accuracies)."""
    flats = [flatten(r.config.to_dict()) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]

