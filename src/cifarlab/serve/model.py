"""The served model: a run folder loaded once, with a version and a batched forward."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.runs import WEIGHTS, LoadedRun, load_run

__all__ = ["ServedModel", "load_served_model"]


@dataclass
class ServedModel:
    """One loaded run. Immutable once built: a reload builds a new one and swaps the pointer."""

    name: str
    version: str  # first 12 hex digits of the weights' SHA-256
    run: LoadedRun
    precision: str  # fp32 | bf16
    tta: int
    info: dict[str, Any] = field(default_factory=dict)
    _norm: Any = field(default=None, repr=False)  # built once, on the first forward

    @property
    def classes(self) -> list[str]:
        return self.run.classes

    @property
    def image_size(self) -> int:
        return self.run.image_size

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 batch N×H×W×3: N×C float32."""
        from cifarlab.train import Normalizer, predict_logits

        cpu = torch.device("cpu")
        if self._norm is None:
            self._norm = Normalizer(self.run.mean, self.run.std, cpu)
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        logits = predict_logits(self.run.model, batch, self._norm, cpu, self.precision,
                                self.tta)
        return torch.softmax(logits.float(), dim=1).numpy()


def load_served_model(path: Path | str, precision: str = "fp32", tta: int = 0) -> ServedModel:
    """Load a run folder for serving (raises :class:`~cifarlab.errors.RunError`)."""
    path = Path(path)
    run = load_run(path)
    run.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()[:12]
    s = run.summary
    info = {
        "model": run.config.model,
        "run": path.name,
        "classes": run.classes,
        "image_size": run.image_size,
        "test_accuracy": s.get("test_acc"),
        "test_tta": run.config.tta,
        "val_accuracy": s.get("val_acc"),
        "trained_seconds": s.get("train_seconds"),
        "parameters": sum(p.numel() for p in run.model.parameters()),
    }
    served = ServedModel(path.name, digest, run, precision, tta, info)
    served.forward(np.zeros((1, run.image_size, run.image_size, 3), np.uint8))  # warm up
    return served
