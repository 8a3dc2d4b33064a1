"""``train --engine keras``: a Keras model trained by Keras's own ``model.fit``.

For users who want Keras's loop (and its callbacks) and for the benchmark that compares it with
cifarlab's trainer. Everything around the loop is cifarlab's, so the two engines differ only in
the loop:

- batches come from cifarlab's data layer and augmentation (:class:`cifarlab.loader.DeviceLoader`)
  through a ``keras.utils.PyDataset``, as N×H×W×C views of its channels_last batches;
- the recipe maps onto Keras: SGD with Nesterov momentum at the same effective rate, the same
  triangular schedule per step, label smoothing through ``CategoricalCrossentropy``, and weight
  decay as Keras's decoupled ``weight_decay`` at the same shrink per step (Keras's SGD has no
  coupled L2). No weight averaging (``optim.ema``), no Muon, and whole epochs only (fractional
  ``optim.epochs`` round up);
- each epoch's row (train loss, validation loss and accuracy, seconds, images/s) reaches
  cifarlab's callbacks (the run folder, the epoch table), and the final validation and test
  figures are measured by cifarlab's evaluation with the run's TTA, as for the other engine.

The doctor's training monitors hook the torch optimizer, which this loop does not use; they are
not run here (the preflight and behavioural checks of ``cifarlab doctor`` still apply to the
model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cifarlab.builders import build_model
from cifarlab.callbacks import Callback, TrainResult, TrainState
from cifarlab.config import TrainConfig
from cifarlab.data import SplitData, load_data
from cifarlab.errors import ConfigError
from cifarlab.hardware import resolve_device, resolve_precision
from cifarlab.infer import Normalizer, Scores, predict_logits, scores, to_device_images
from cifarlab.kerasnet import KerasModule, import_keras
from cifarlab.loader import DeviceLoader
from cifarlab.optim import schedule_factor
from cifarlab.trainer import finish

__all__ = ["train_with_keras"]


def train_with_keras(config: TrainConfig, callbacks: Sequence[Callback] = (), *,
                     data: SplitData | None = None, evaluate_test: bool = True,
                     progress: bool = True) -> TrainResult:
    """Train ``config.model`` (a Keras model) with ``model.fit``; same result as
    :func:`cifarlab.trainer.train`."""
    config.validate()
    if config.optim.optimizer != "sgd":
        raise ConfigError("--engine keras trains with Keras's SGD; optim.optimizer must be sgd.")
    keras = import_keras()
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    data = data if data is not None else load_data(config.data)
    if len(data.train) == 0:
        raise ConfigError("The training split is empty.")
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        model = build_model(config, len(data.classes), data.train.images.shape[1])
    finally:
        keras.config.set_dtype_policy(policy)
    if not isinstance(model, KerasModule):
        raise ConfigError(f"--engine keras needs a Keras model; {config.model} is a PyTorch "
                          "module. Use the default engine.")
    model = model.to(device)
    net = model.keras_model
    norm = Normalizer(data.mean, data.std, device)
    loader = DeviceLoader(data.train, config, norm, device)
    steps_per_epoch = max(1, len(loader))
    epochs = math.ceil(config.optim.epochs)  # model.fit runs whole epochs
    total_steps = steps_per_epoch * epochs
    o = config.optim
    # cifarlab's lr is per 1024 examples of a summed loss, decoupled from momentum; Keras's loss
    # is a batch mean, so the same step is that rate times the batch size
    peak = o.lr / (1024 * (1 + 1 / (1 - o.momentum))) * loader.batch_size
    factor = schedule_factor(config, total_steps)

    schedule_base: Any = keras.optimizers.schedules.LearningRateSchedule

    class Triangle(schedule_base):  # (never saved: the run folder keeps weights, not this)
        def __call__(self, step: Any) -> Any:
            return peak * factor(int(step))

        def get_config(self) -> dict[str, Any]:
            return {}

    # cifarlab's decay shrinks the weights by wd·batch/1024 per step, spread through momentum
    # as 1/(1-m) of a 1 + 1/(1-m) kilostep; Keras's decoupled decay shrinks by lr·weight_decay
    amplification = (1 / (1 - o.momentum)) / (1 + 1 / (1 - o.momentum))
    decay = o.weight_decay * loader.batch_size / 1024 * amplification / peak
    optimizer = keras.optimizers.SGD(learning_rate=Triangle(), momentum=o.momentum,
                                     nesterov=o.momentum > 0,
                                     weight_decay=decay if decay > 0 else None)
    loss = keras.losses.CategoricalCrossentropy(
        from_logits=not model.outputs_probabilities, label_smoothing=o.label_smoothing)
    net.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    n_classes = len(data.classes)
    val = data.val if data.val is not None and len(data.val) else None
    val_images = to_device_images(val.images, device) if val is not None else None

    def evaluate(images: torch.Tensor, labels: np.ndarray, tta: int,
                 at: str = precision) -> Scores:
        return scores(predict_logits(model, images, norm, device, at, tta), labels)

    state = TrainState(config, model, _NoTorchOptimizer(), device, precision,  # type: ignore[arg-type]
                       total_steps, steps_per_epoch)
    for cb in callbacks:
        cb.on_train_start(state)
    bridge = _make_bridge(keras, state, callbacks, loader, val, val_images, evaluate,
                          total_steps, progress)
    dataset = _batches(keras, loader, n_classes)
    t_train = time.perf_counter()
    net.fit(dataset, epochs=epochs, verbose=0, callbacks=[bridge])  # the bridge shows progress
    train_seconds = time.perf_counter() - t_train - bridge.eval_seconds

    return finish(state, data, evaluate, val_images, callbacks, evaluate_test=evaluate_test,
                  train_seconds=train_seconds, t_start=t_start, extras={"engine": "keras"})


class _NoTorchOptimizer:
    """What ``TrainState.optimizer`` holds under Keras's loop: nothing to hook."""

    param_groups: tuple[dict[str, Any], ...] = ()


def _batches(keras: Any, loader: DeviceLoader, n_classes: int) -> Any:
    """cifarlab's augmented batches as a PyDataset, one pass of the loader per epoch."""

    base: Any = keras.utils.PyDataset

    class Batches(base):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self._order: torch.Tensor | None = None

        def __len__(self) -> int:
            return len(loader)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            if self._order is None:
                self._order = loader.epoch_order()
            x, y = loader.batch(self._order, index)
            # channels_last N×C×H×W is N×H×W×C in memory: the permute is a view
            return x.permute(0, 2, 3, 1), torch.nn.functional.one_hot(y, n_classes).float()

        def on_epoch_end(self) -> None:
            self._order = None
            loader.epoch += 1  # the alternating flip turns over

    return Batches()


def _make_bridge(keras: Any, state: TrainState, callbacks: Sequence[Callback],
                 loader: DeviceLoader, val: Any, val_images: torch.Tensor | None,
                 evaluate: Any, total_steps: int, progress: bool) -> Any:
    """A Keras callback that turns Keras's epochs into cifarlab's rows (and shows the same
    progress bar as cifarlab's trainer)."""
    epochs = total_steps // max(1, len(loader))

    base: Any = keras.callbacks.Callback

    class Bridge(base):
        eval_seconds = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            state.epoch = epoch
            self._t0 = time.perf_counter()
            self._bar = tqdm(total=len(loader), leave=False, unit="step",
                             desc=f"epoch {epoch + 1}/{epochs} (keras)",
                             disable=None if progress else True)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            state.step += 1
            self._bar.update(1)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self._bar.close()
            seconds = time.perf_counter() - self._t0
            seen = len(loader) * loader.batch_size
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": state.step,
                "train_loss": float((logs or {}).get("loss", float("nan"))),
                "val_loss": None, "val_acc": None, "val_cal_loss": None, "seconds": round(seconds, 3),
                "images_per_second": round(seen / seconds, 1) if seconds > 0 else None,
            }
            last = state.step >= total_steps
            if val is not None and val_images is not None and (
                    (epoch + 1) % state.config.eval_every == 0 or last):
                t = time.perf_counter()
                state.model.eval()
                row["val_loss"], row["val_acc"], row["val_cal_loss"] = evaluate(
                    val_images, val.labels, 0)
                state.model.train()
                self.eval_seconds += time.perf_counter() - t
            state.history.append(row)
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            if state.should_stop:
                self.model.stop_training = True

    return Bridge()
