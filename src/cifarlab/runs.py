"""Run folders: everything needed to reload, evaluate, predict with or serve a trained model.

``runs/<name>/`` holds ``config.json`` (the full :class:`TrainConfig`), ``model.safetensors``
(weights; nothing a user may load is a pickle), ``metrics.jsonl`` (one row per epoch) and
``summary.json`` (accuracies, losses, seconds, data SHA-256, classes, preprocessing, versions).
Every file is written atomically, so a crash never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.errors import CifarlabError, RunError
from cifarlab.files import atomic_write, atomic_write_text
from cifarlab.models import create_model

if TYPE_CHECKING:
    from cifarlab.data import Dataset
    from cifarlab.train import TrainResult

__all__ = [
    "LoadedRun",
    "default_run_name",
    "evaluate_run",
    "finish_run",
    "load_run",
    "predict_files",
    "start_run",
    "write_metrics",
]

CONFIG, WEIGHTS, METRICS, SUMMARY = (
    "config.json", "model.safetensors", "metrics.jsonl", "summary.json",
)


def default_run_name(model: str) -> str:
    return f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(run_dir: Path | str, config: TrainConfig) -> Path:
    path = Path(run_dir)
    if (path / SUMMARY).exists():
        raise RunError(f"{path} already holds a finished run; choose another --name.")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / CONFIG, config.to_json() + "\n")
    return path


def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path / METRICS, "".join(json.dumps(r) + "\n" for r in history))


def _versions() -> dict[str, str]:
    import PIL
    import safetensors

    from cifarlab import __version__

    return {
        "cifarlab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def finish_run(path: Path, result: TrainResult) -> None:
    """Write weights, then the summary (whose presence marks the run complete)."""
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    meta = {"format": "cifarlab-run-1", "model": result.config.model}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=meta))
    n_params = sum(p.numel() for p in result.model.parameters())
    summary = {
        "model": result.config.model,
        "width": result.config.width,
        "parameters": n_params,
        "classes": result.classes,
        "preprocessing": {
            "image_size": result.config.data.image_size,
            "mean": result.mean,
            "std": result.std,
            "note": "center-crop to square, resize, scale to [0,1], subtract mean, divide by std",
        },
        "val_loss": result.val_loss,
        "val_acc": result.val_acc,
        "test_loss": result.test_loss,
        "test_acc": result.test_acc,
        "tta": result.config.tta,
        "epochs_run": len(result.history),
        "train_seconds": round(result.train_seconds, 2),
        "total_seconds": round(result.total_seconds, 2),
        "stopped_early": result.stopped_early,
        "doctor": result.findings,
        "data_sha256": result.data_sha256,
        "data_source": result.source,
        "precision": result.precision,
        "device": result.device,
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(path / SUMMARY, json.dumps(summary, indent=2) + "\n")


@dataclass
class LoadedRun:
    path: Path
    config: TrainConfig
    summary: dict[str, Any]
    model: nn.Module  # on CPU, in eval mode

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


def load_run(path: Path | str) -> LoadedRun:
    """Rebuild a trained model from its run folder alone."""
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
        classes = summary["classes"]
        size = int(summary["preprocessing"]["image_size"])
    except (json.JSONDecodeError, KeyError, TypeError, CifarlabError) as exc:
        raise RunError(f"{path}: damaged {CONFIG} or {SUMMARY} ({exc}).") from exc
    model = create_model(config.model, len(classes), config.width, size)
    try:
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise RunError(f"{path / WEIGHTS}: cannot load weights ({exc}).") from exc
    model.eval()
    return LoadedRun(path, config, summary, model)


def evaluate_run(
    run: LoadedRun | Path | str, ds: Dataset, tta: int | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Loss and accuracy of a run on a dataset whose class names match the run's."""
    from cifarlab.train import evaluate, resolve_device, resolve_precision

    run = run if isinstance(run, LoadedRun) else load_run(run)
    if list(ds.classes) != run.classes:
        raise RunError(
            f"dataset classes {ds.classes} differ from the run's classes {run.classes}."
        )
    if ds.images.shape[1] != run.image_size:
        raise RunError(
            f"dataset images are {ds.images.shape[1]}px but the run expects {run.image_size}px; "
            f"pass --image-size {run.image_size}."
        )
    dev = resolve_device(device)
    precision = resolve_precision(run.config.precision, dev)
    model = run.model.to(dev)
    t = run.config.tta if tta is None else tta
    loss, acc = evaluate(model, ds, run.mean, run.std, dev, precision, t)
    return {"loss": loss, "accuracy": acc, "images": len(ds), "tta": t}


def predict_files(
    run: LoadedRun | Path | str, files: Sequence[Path | str], top_k: int = 3
) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for image files of any common format and size."""
    from cifarlab.imaging import decode_image
    from cifarlab.train import Normalizer, predict_logits

    run = run if isinstance(run, LoadedRun) else load_run(run)
    arrays = [decode_image(Path(f), run.image_size) for f in files]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    cpu = torch.device("cpu")
    logits = predict_logits(run.model, batch, Normalizer(run.mean, run.std, cpu), cpu, "fp32",
                            tta=1)
    probs = torch.softmax(logits, dim=1)
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    return [
        {
            "file": str(f),
            "top": [
                {"class": run.classes[i], "probability": round(p, 6)}
                for p, i in zip(top_p[n].tolist(), top_i[n].tolist(), strict=True)
            ],
        }
        for n, f in enumerate(files)
    ]
