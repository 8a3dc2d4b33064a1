"""The one inference path: preprocessing, the forward pass, test-time augmentation and top-k.

:class:`Predictor` is built from a run folder and answers for ``evaluate``, ``predict``,
``serve`` alike, so one run folder behaves the same whoever opens it: the same
normalization, the same TTA (the run's own, unless asked otherwise), the same precision and the
same JSON for a prediction. The trainer uses :func:`predict_logits` for its own evaluations, and
the doctor feeds models through the same :class:`Normalizer`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn

from cifarlab.data import Dataset
from cifarlab.errors import ConfigError, RunError
from cifarlab.hardware import INFERENCE_PRECISION, autocast, resolve_device, resolve_precision
from cifarlab.imaging import decode_image
from cifarlab.runs import LoadedRun, load_run

__all__ = [
    "DEFAULT_TOP_K",
    "Normalizer",
    "Predictor",
    "Scores",
    "calibrated_loss",
    "loss_and_accuracy",
    "predict_logits",
    "scores",
    "to_device_images",
]

DEFAULT_TOP_K = 5  # classes per prediction, everywhere (CLI, REST, page)


class Normalizer:
    """uint8 N×C×H×W -> normalized float, with the statistics of the training split."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std


def to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """N×H×W×C uint8 (possibly memory-mapped) -> N×C×H×W uint8 tensor on ``device``."""
    arr = np.asarray(images)
    t = torch.from_numpy(arr if arr.flags.writeable else np.array(arr))  # memmaps are read-only
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    norm: Normalizer,
    device: torch.device,
    precision: str = "fp32",
    tta: int = 0,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Logits (float32, on CPU) for N×C×H×W uint8 images, in eval and inference mode.

    ``tta``: 0 none; 1 averages the image and its mirror; 2 also averages 1-pixel translations
    up-left and down-right (airbench's 6-view scheme).
    """
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.inference_mode(), autocast(device, precision):
            for i in range(0, len(images), batch_size):
                x = norm(images[i : i + batch_size].to(device))
                x = x.contiguous(memory_format=torch.channels_last)
                outs.append(_tta_forward(model, x, tta).float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


def _tta_forward(model: nn.Module, x: torch.Tensor, tta: int) -> torch.Tensor:
    def mirror(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(v) + 0.5 * model(v.flip(-1))

    if tta == 0:
        return model(x)
    if tta == 1:
        return mirror(x)
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [xp[:, :, 0:h, 0:w], xp[:, :, 2 : h + 2, 2 : w + 2]]
    return 0.5 * mirror(x) + 0.25 * sum(mirror(s.contiguous(memory_format=torch.channels_last))
                                          for s in shifted)


def loss_and_accuracy(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    """Plain cross-entropy (no label smoothing) and accuracy of logits against labels."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


class Scores(NamedTuple):
    """What one evaluation measures (see :func:`scores`)."""

    loss: float  # plain cross-entropy
    acc: float
    cal_loss: float  # cross-entropy at the temperature that minimises it (calibrated_loss)


def scores(logits: torch.Tensor, labels: np.ndarray) -> Scores:
    loss, acc = loss_and_accuracy(logits, labels)
    return Scores(loss, acc, calibrated_loss(logits, labels)[0])


def calibrated_loss(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    """Cross-entropy after temperature scaling, and the temperature: ``min over T > 0`` of the
    mean cross-entropy of ``logits / T`` (Guo et al. 2017, "On calibration of modern neural
    networks"; as a model-comparison score, the "calibrated log-likelihood" of Ashukha et al.
    2020, "Pitfalls of in-domain uncertainty estimation").

    Plain cross-entropy ranks two equally accurate models by how confident they are, so it
    rewards settings that only sharpen the softmax (less label smoothing, less weight decay)
    and penalises ones that blunt it. One scalar temperature removes that confidence scale
    and leaves what the logits know. The loss is convex in 1/T, so a bounded scalar search
    over log(1/T) finds the minimum; T = 1 is a candidate too, so the result never exceeds
    the plain cross-entropy. Non-finite logits give the plain loss (inf or nan) and T = 1.
    """
    z = logits.detach().to(torch.float64)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    plain = F.cross_entropy(z, y).item() if len(y) else float("nan")
    if not len(y) or not math.isfinite(plain) or not bool(torch.isfinite(z).all()):
        return plain, 1.0
    picked = z.gather(1, y[:, None]).squeeze(1)

    def loss_at(log_beta: float) -> float:
        b = math.exp(log_beta)
        return float((torch.logsumexp(b * z, dim=1) - b * picked).mean())

    found = minimize_scalar(loss_at, bounds=(-7.0, 7.0), method="bounded",
                            options={"xatol": 1e-5})
    if float(found.fun) < plain:
        return float(found.fun), float(math.exp(-found.x))
    return plain, 1.0


@dataclass
class Predictor:
    """A model with its preprocessing and inference settings; build it with :meth:`from_run`.

    Example::

        p = Predictor.from_run("runs/airnet-20261126-101500")
        print(p.predict_files(["cat.jpg"]))        # the same JSON as POST /v1/predict
        print(p.evaluate(test_split))              # loss and accuracy at the run's TTA
    """

    model: nn.Module
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    tta: int = 0
    precision: str = INFERENCE_PRECISION  # fp32 unless asked: the same numbers everywhere
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = ""  # the served model's name: its run folder's name
    version: str = ""  # the first 12 hex digits of the weights' SHA-256
    info: dict[str, Any] = field(default_factory=dict)  # what a page or /v1/model shows
    _norm: Normalizer | None = field(default=None, repr=False)

    @classmethod
    def from_run(cls, run: LoadedRun | Path | str, tta: int | None = None,
                 precision: str = INFERENCE_PRECISION, device: str = "cpu") -> Predictor:
        """Load a run folder (or wrap a loaded one). ``tta`` defaults to the run's own, the one
        its test accuracy was measured with; ``precision`` is ``fp32``, ``bf16`` or ``auto``."""
        run = run if isinstance(run, LoadedRun) else load_run(run)
        t = run.tta if tta is None else tta
        if t not in (0, 1, 2):
            raise ConfigError(f"tta must be 0, 1 or 2, got {t}.")
        if precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {precision!r}.")
        dev = resolve_device(device)
        model = run.model.to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        s = run.summary
        info = {
            "model": run.config.model,
            "run": run.path.name,
            "classes": run.classes,
            "image_size": run.image_size,
            # the accuracy shown next to the model is the one measured at the serving TTA
            "test_accuracy": s.get("test_acc") if t == run.tta else None,
            "test_accuracy_tta": run.tta,
            "tta": t,
            "val_accuracy": s.get("val_acc") if t == run.tta else None,
            "trained_seconds": s.get("train_seconds"),
            "parameters": s.get("parameters") or sum(p.numel() for p in model.parameters()),
        }
        return cls(model, run.classes, run.mean, run.std, run.image_size, t,
                   resolve_precision(precision, dev), dev, run.path.name,
                   run.weights_sha256[:12], info)

    # ------------------------------------------------------------------------- arrays in

    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Logits (N×C float32, CPU) of uint8 images N×H×W×3 at this predictor's settings."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected N×{self.image_size}×{self.image_size}×3 uint8 images, "
                             f"got {images.shape}")
        if self._norm is None:
            self._norm = Normalizer(self.mean, self.std, self.device)
        arr = np.ascontiguousarray(images)
        if not arr.flags.writeable:  # a memory-mapped split: torch wants writable memory
            arr = arr.copy()
        batch = torch.from_numpy(arr).permute(0, 3, 1, 2)
        return predict_logits(self.model, batch, self._norm, self.device, self.precision,
                              self.tta)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities N×C float32 of uint8 images N×H×W×3."""
        return torch.softmax(self.logits(images), dim=1).numpy()

    def evaluate(self, ds: Dataset) -> dict[str, Any]:
        """Plain cross-entropy loss and accuracy on a dataset whose classes match the run's."""
        if list(ds.classes) != self.classes:
            raise RunError(
                f"dataset classes {ds.classes} differ from the run's classes {self.classes}."
            )
        if ds.images.shape[1] != self.image_size:
            raise RunError(
                f"dataset images are {ds.images.shape[1]}px but the run expects "
                f"{self.image_size}px; pass --image-size {self.image_size}."
            )
        if len(ds) == 0:
            raise RunError("the dataset split to evaluate on is empty.")
        logits = torch.cat([self.logits(np.asarray(ds.images[i : i + 4096]))
                            for i in range(0, len(ds), 4096)])
        loss, acc = loss_and_accuracy(logits, ds.labels)
        return {"loss": loss, "accuracy": acc, "images": len(ds), "tta": self.tta,
                "precision": self.precision}

    # -------------------------------------------------------------------------- files in

    def decode(self, data: bytes | Path, name: str | None = None, **limits: Any) -> np.ndarray:
        """Any common image format and size -> H×W×3 uint8, as every path into cifarlab does."""
        return decode_image(data, self.image_size, name=name, **limits)

    def top(self, probs: np.ndarray, k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(self.classes)))]
        return [{"class": self.classes[i], "probability": round(float(probs[i]), 6)}
                for i in order]

    def describe(self, filename: str, sha256: str, probs: np.ndarray,
                 k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """One image's prediction, in the shape every interface answers with."""
        return {"filename": filename, "sha256": sha256, "top": self.top(probs, k)}

    def predict_files(self, files: Sequence[Path | str],
                      top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """Top-k classes of image files: the same JSON as ``POST /v1/predict``."""
        raw = [Path(f).read_bytes() for f in files]
        arrays = np.stack([self.decode(b, name=str(f)) for b, f in zip(raw, files, strict=True)])
        probs = self.probabilities(arrays)
        return {
            "model": self.name, "version": self.version, "tta": self.tta,
            "predictions": [self.describe(str(f), hashlib.sha256(b).hexdigest(), p, top_k)
                            for f, b, p in zip(files, raw, probs, strict=True)],
        }
