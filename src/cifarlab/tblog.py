"""TensorBoard event files for a training run, so that ``tensorboard --logdir runs`` shows what
the doctor saw.

:class:`TensorBoardWriter` is a :class:`~cifarlab.callbacks.Callback`. It writes the training
loss and learning rate every few steps, and each epoch's metrics (train and validation loss and
accuracy). With the doctor's monitor beside it, it also writes each monitor sample: the total
gradient norm, the update/weight ratio of every layer and the fraction of every activation
channel that fires. Weight histograms are written at the end of each epoch.

``tensorboard`` is an optional extra (``pip install 'cifarlab[tensorboard]'``); without it,
asking for event files fails at once with one line that says what to install.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cifarlab.callbacks import Callback, TrainResult, TrainState
from cifarlab.errors import ConfigError

__all__ = ["TensorBoardWriter"]


def _summary_writer(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("TensorBoard event files need the tensorboard package: "
                          "pip install 'cifarlab[tensorboard]'.") from None
    return SummaryWriter(log_dir=str(logdir))


class TensorBoardWriter(Callback):
    """Write TensorBoard event files into ``logdir``. ``monitor`` is the run's doctor monitor
    (anything with its ``series``), if there is one."""

    def __init__(self, logdir: Path, monitor: Any = None, every: int | None = None):
        self.logdir, self.monitor, self.every = Path(logdir), monitor, every
        self._writer = _summary_writer(self.logdir)  # fails before any training
        self._written = 0  # monitor samples written so far

    def on_train_start(self, state: TrainState) -> None:
        self.every = self.every or max(1, state.steps_per_epoch // 10)
        cfg = state.config
        self._writer.add_text("config", f"model {cfg.model}, {cfg.optim.epochs:g} epochs, "
                                        f"batch {cfg.optim.batch_size}, lr {cfg.optim.lr:g}")

    def on_step_end(self, state: TrainState, loss: torch.Tensor, inputs: torch.Tensor,
                    labels: torch.Tensor) -> None:
        assert self.every is not None
        if state.step % self.every:
            return
        self._scalar("train/loss", float(loss), state.step)  # a sync every k steps only
        self._scalar("train/lr", float(state.optimizer.param_groups[0]["lr"]), state.step)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self._scalar(f"epoch/{key}", float(value), state.step)
        self._monitor_samples()
        for name, p in state.model.named_parameters():
            values = p.detach().float().cpu()
            if torch.isfinite(values).all():
                self._writer.add_histogram(f"weights/{name}", values, state.step)
        self._writer.flush()

    def on_train_end(self, state: TrainState, result: TrainResult) -> None:
        self._monitor_samples()
        for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
            value = getattr(result, key, None)
            if isinstance(value, (int, float)):
                self._scalar(f"final/{key}", float(value), state.step)
        self._writer.close()

    def _monitor_samples(self) -> None:
        series = getattr(self.monitor, "series", None)
        if not series:
            return
        steps = series.get("step", [])
        for i in range(self._written, len(steps)):
            step = int(steps[i])
            self._scalar("doctor/loss", series["loss"][i], step)
            self._scalar("doctor/grad_norm", series["grad_norm"][i], step)
            for layer, ratio in series["update_ratio"][i].items():
                self._scalar(f"doctor/update_ratio/{layer}", ratio, step)
            for layer, frac in series["active_fraction"][i].items():
                self._scalar(f"doctor/active_fraction/{layer}", frac, step)
        self._written = len(steps)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if math.isfinite(value):
            self._writer.add_scalar(tag, value, step)
