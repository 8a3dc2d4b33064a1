"""The trainer's contract with whatever watches it: :class:`Callback`, the :class:`TrainState`
it sees, the :class:`StopReason` it may give, and the :class:`TrainResult` it gets at the end.

Kept apart from the trainer so that run folders, the doctor and the tuner can watch a run
without importing the training loop, and the loop imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cifarlab.config import TrainConfig

__all__ = ["Callback", "EpochTable", "StopReason", "TrainResult", "TrainState"]


@dataclass(frozen=True)
class StopReason:
    """Why a run ended before its last step.

    ``by`` names who stopped it (``"doctor"``, ``"tune"``, ``"user"``, a callback's own name);
    ``kind`` is a short machine-readable word (``"nonfinite"``, ``"diverged"``, ``"pruned"``,
    ``"interrupted"``); ``message`` is for people.
    """

    by: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.by}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"by": self.by, "kind": self.kind, "message": self.message}


@dataclass
class TrainState:
    """What callbacks see. Call :meth:`stop` to end training after the current step."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: StopReason | None = None

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: StopReason) -> None:
        """Ask the trainer to stop; the first reason given is the one kept."""
        if self.stop_reason is None:
            self.stop_reason = reason


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    classes: list[str]
    mean: list[float]
    std: list[float]
    history: list[dict[str, Any]]
    train_seconds: float
    total_seconds: float
    val_loss: float | None
    val_acc: float | None
    test_loss: float | None
    test_acc: float | None
    stopped_early: StopReason | None
    data_sha256: str
    source: str
    precision: str
    device: str
    val_cal_loss: float | None = None  # validation loss at the calibrated temperature
    # Callbacks add what they learned in on_train_end (the doctor: "doctor" -> findings);
    # a RunWriter placed after them stores it in summary.json.
    extras: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Hooks into :func:`cifarlab.trainer.train`. Subclass and override what you need.

    ``on_step_end`` receives the step's mean loss as a 0-d tensor: calling ``.item()`` on it
    forces a device sync, so monitors should do that only every k steps.
    """

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(
        self, state: TrainState, loss: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, state: TrainState, result: TrainResult) -> None: ...


class EpochTable(Callback):
    """Prints one fixed-width row per epoch (airbench style), around any progress bar."""

    HEADER = (f"{'epoch':>6} {'step':>6} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} "
              f"{'seconds':>8} {'img/s':>7}")

    def __init__(self, write: Callable[[str], Any] | None = None):
        if write is None:
            from tqdm.auto import tqdm

            write = tqdm.write
        self.write = write

    def on_train_start(self, state: TrainState) -> None:
        self.write(self.HEADER)
        self.write("-" * len(self.HEADER))

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        def f(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"

        m = metrics
        self.write(
            f"{m['epoch']:>6} {m['step']:>6} {f(m['train_loss'], '.4f'):>10} "
            f"{f(m['val_loss'], '.4f'):>9} {f(m['val_acc'], '.4f'):>8} "
            f"{m['seconds']:>8.1f} {f(m['images_per_second'], '.0f'):>7}"
        )
