"""``train(config, callbacks) -> TrainResult``: the fast trainer.

Built the way the fastest CIFAR-10 trainers are (airbench, Keller Jordan 2024): the whole
dataset is one uint8 tensor on the training device, augmentation runs on whole batches there
(:mod:`cifarlab.loader`), Nesterov SGD with decoupled hyperparameters and a triangular schedule,
label smoothing, lookahead-style weight averaging (:mod:`cifarlab.optim`), channels_last, bf16
autocast where the hardware has bf16 units, and flip/translate test-time augmentation
(:mod:`cifarlab.infer`). Measured on a 2-core EPYC: see docs/BENCHMARKS.md.

The trainer knows nothing about folders or doctors: a :class:`cifarlab.runs.RunWriter` writes
the run folder and a :class:`cifarlab.doctor.DoctorMonitor` watches, when the caller passes them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cifarlab.builders import build_model
from cifarlab.callbacks import Callback, StopReason, TrainResult, TrainState
from cifarlab.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cifarlab.config import TrainConfig
from cifarlab.data import SplitData, load_data
from cifarlab.errors import ConfigError
from cifarlab.hardware import (
    INFERENCE_PRECISION,
    cudnn_mode,
    resolve_device,
    resolve_precision,
)
from cifarlab.infer import Normalizer, Scores, predict_logits, scores, to_device_images
from cifarlab.kerasnet import KerasModule
from cifarlab.loader import DeviceLoader
from cifarlab.optim import Lookahead, Muon, build_optimizer
from cifarlab.step import GraphedStep, training_step

__all__ = ["finish", "train", "training_step"]

log = logging.getLogger(__name__)


def _step_function(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                   loss_fn: Callable[..., torch.Tensor], device: torch.device,
                   precision: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainer's step: :func:`training_step`, or its CUDA-graph replay."""
    if config.cuda_graphs and device.type == "cuda":
        assert isinstance(optimizer, Muon)  # build_optimizer(capturable=True) makes one
        optimizer.lr_from_tensors(device)
        return GraphedStep(model, optimizer, loss_fn, device, precision)

    def eager(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return training_step(model, optimizer, loss_fn, x, y, device, precision)

    return eager


def train(
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    data: SplitData | None = None,
    evaluate_test: bool = True,
    progress: bool = True,
    checkpoint: Path | None = None,
    pause_at_epoch: int | None = None,
    pause_at_step: int | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` and return the model with its metrics.

    Per-step and per-epoch metrics reach ``callbacks`` in order; a callback may end training
    with ``state.stop(StopReason(...))``. The test split is evaluated only at the end, and only
    when ``evaluate_test`` is true. Raises :class:`ConfigError` for invalid settings.

    Pause and resume (:mod:`cifarlab.checkpoint`): with ``checkpoint`` (a folder) the run
    continues from the state saved there, if any, and saves its state there when it ends;
    with ``pause_at_epoch`` (or ``pause_at_step``, optimizer steps, which may fall inside an
    epoch) too, it stops there (validation measured, no test), with ``stopped_early.kind ==
    "paused"``. Continued with the same config, it ends with the same weights as a run straight
    through (bitwise on the CPU).

    Example::

        from cifarlab import TrainConfig, train
        from cifarlab.runs import RunWriter
        result = train(default_config("airnet"), [RunWriter("runs/first")])
    """
    config.validate()
    device = resolve_device(config.device)
    for name, at in (("pause_at_epoch", pause_at_epoch), ("pause_at_step", pause_at_step)):
        if at is not None and (checkpoint is None or at < 1):
            raise ConfigError(f"{name} needs a checkpoint folder to save the state in, and a "
                              f"count of at least 1 (got {at}).")
    if pause_at_epoch is not None and pause_at_step is not None:
        raise ConfigError("Give pause_at_epoch or pause_at_step, not both.")
    with cudnn_mode(device, config.deterministic):
        return _train(config, list(callbacks), data, evaluate_test, progress, device,
                      checkpoint, pause_at_epoch, pause_at_step)


def _train(config: TrainConfig, callbacks: list[Callback], data: SplitData | None,
           evaluate_test: bool, progress: bool, device: torch.device,
           checkpoint: Path | None = None, pause_at_epoch: int | None = None,
           pause_at_step: int | None = None) -> TrainResult:
    t_start = time.perf_counter()
    precision = resolve_precision(config.precision, device)
    data = data if data is not None else load_data(config.data)
    if len(data.train) == 0:
        raise ConfigError("The training split is empty.")

    torch.manual_seed(config.seed)
    size = data.train.images.shape[1]
    model = build_model(config, len(data.classes), size).to(device)
    if config.channels_last and not isinstance(model, KerasModule):
        # (a Keras model keeps its kernels as they are: it lays them out per call itself, and
        # its channels_last inputs reach it as N×H×W×C views)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if config.cuda_graphs and isinstance(model, KerasModule):
        raise ConfigError("cuda_graphs: true captures a PyTorch module's step; a Keras model "
                          "runs through cifarlab.kerasfast instead. Set cuda_graphs: false.")
    if config.compile:
        if isinstance(model, KerasModule):
            raise ConfigError("compile: true compiles a PyTorch module; a Keras model runs "
                              "through cifarlab.kerasfast instead. Set compile: false.")
        # in place: the state_dict keeps its names
        model.compile(mode=None if config.compile_mode == "default" else config.compile_mode)
    norm = Normalizer(data.mean, data.std, device)
    loader = DeviceLoader(data.train, config, norm, device)
    steps_per_epoch = max(1, len(loader))
    total_steps = max(1, math.ceil(steps_per_epoch * config.optim.epochs))
    pause_step = (pause_at_epoch * steps_per_epoch if pause_at_epoch is not None
                  else pause_at_step)
    # (built capturable whenever the config asks for graphs, on any device, so that a run
    # paused on one device continues on another with the same optimizer state)
    optimizer, scheduler = build_optimizer(model, config, total_steps,
                                           capturable=config.cuda_graphs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing, reduction="sum")
    step_fn = _step_function(config, model, optimizer, loss_fn, device, precision)
    state = TrainState(config, model, optimizer, device, precision, total_steps, steps_per_epoch)
    for cb in callbacks:
        cb.on_train_start(state)

    t_train = time.perf_counter()
    init = getattr(model, "init_from_data", None)
    resumed = load_checkpoint(checkpoint, config) if checkpoint is not None else None
    if resumed is None and callable(init):  # (a resumed run's weights come from its checkpoint)
        # A seeded random sample: splits are stored sorted by class, so a prefix would be
        # one class only and would whiten for, say, airplanes and sky.
        rng = np.random.default_rng(config.seed)
        pick = np.sort(rng.permutation(len(data.train))[:5000])
        init(norm(to_device_images(data.train.images[pick], device)))
    train_seconds = time.perf_counter() - t_train

    lookahead: Lookahead | None = None
    start_epoch = in_epoch = 0
    if resumed is not None:
        model.load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        torch.set_rng_state(resumed.rng["torch"])
        loader.gen.set_state(resumed.rng["loader"])
        loader.epoch, state.step, start_epoch = resumed.loader_epoch, resumed.step, resumed.epoch
        in_epoch = resumed.in_epoch
        state.history = list(resumed.history)
        train_seconds = resumed.train_seconds
        # at an epoch's end the averaged weights were handed back to the net, so the net is
        # the average: a fresh Lookahead of it is the one the run had; inside an epoch the
        # average was saved apart
        lookahead = Lookahead(model) if resumed.averaging else None
        if lookahead is not None and resumed.averaged is not None:
            for k, v in resumed.averaged.items():
                lookahead.avg[k].copy_(v)
    ema_start = int(config.optim.ema_start_frac * total_steps)
    val = data.val if data.val is not None and len(data.val) else None
    val_images = to_device_images(val.images, device) if val is not None else None

    def evaluate(images: torch.Tensor, labels: np.ndarray, tta: int,
                 at: str = precision) -> Scores:
        return scores(predict_logits(model, images, norm, device, at, tta), labels)

    n_epochs = math.ceil(total_steps / steps_per_epoch)

    def save(epoch: int, done_in_epoch: int = 0, weights: dict[str, torch.Tensor] | None = None,
             loader_rng: torch.Tensor | None = None) -> None:
        assert checkpoint is not None
        inside = done_in_epoch > 0
        save_checkpoint(checkpoint, Checkpoint(
            config=config.to_dict(), epoch=epoch, step=state.step, train_seconds=train_seconds,
            history=state.history, averaging=lookahead is not None, loader_epoch=loader.epoch,
            model=weights if weights is not None else model.state_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng={"torch": torch.get_rng_state(),
                 "loader": loader_rng if loader_rng is not None else loader.gen.get_state()},
            in_epoch=done_in_epoch,
            averaged=lookahead.avg if inside and lookahead is not None else None))

    paused = False
    for epoch in range(start_epoch, n_epochs):
        state.epoch = epoch
        t0 = time.perf_counter()
        hook = getattr(model, "on_epoch_start", None)
        if callable(hook):
            hook(epoch / n_epochs)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        first = in_epoch if epoch == start_epoch else 0  # batches done before a resume
        bar = tqdm(total=min(steps_per_epoch - first, total_steps - state.step), leave=False,
                   desc=f"epoch {epoch + 1}/{n_epochs}", unit="step",
                   disable=None if progress else True)
        epoch_rng = loader.gen.get_state()  # the epoch's order and draws come from here
        order = loader.epoch_order()
        done_in_epoch = 0  # > 0: paused inside the epoch after that many batches
        for i in range(first, steps_per_epoch):
            inputs, labels = loader.batch(order, i)
            loss = step_fn(inputs, labels)
            scheduler.step()
            state.step += 1
            loss_sum += loss.float()
            seen += len(labels)
            if config.optim.ema and state.step >= ema_start and state.step % 5 == 0:
                if lookahead is None:
                    lookahead = Lookahead(model)
                else:
                    # decay warms up over training: move fast early, average hard at the end
                    rho = 0.95**5 * (state.step / total_steps) ** 3
                    lookahead.update(model, rho)
            for cb in callbacks:
                cb.on_step_end(state, loss / len(labels), inputs, labels)
            bar.update(1)
            if state.step >= total_steps or state.should_stop:
                break
            if pause_step is not None and state.step >= pause_step and i + 1 < steps_per_epoch:
                done_in_epoch = i + 1
                break
        else:
            loader.epoch += 1  # (only an epoch run to its end counts, as iterating the loader)
        bar.close()
        weights = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                   if done_in_epoch and lookahead is not None else None)
        if lookahead is not None:
            lookahead.update(model, 1.0)  # hand the averaged weights back to the net
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1 if not done_in_epoch else round(
                epoch + done_in_epoch / steps_per_epoch, 4),
            "step": state.step,
            "train_loss": (loss_sum / max(1, seen)).item(),
            "val_loss": None,
            "val_acc": None,
            "val_cal_loss": None,
            "seconds": round(epoch_seconds, 3),
            "images_per_second": round(seen / epoch_seconds, 1) if epoch_seconds > 0 else None,
        }
        last = state.step >= total_steps or state.should_stop
        pause = pause_step is not None and state.step >= pause_step and not last
        if val is not None and val_images is not None and (
                (epoch + 1) % config.eval_every == 0 or last or pause):
            row["val_loss"], row["val_acc"], row["val_cal_loss"] = evaluate(
                val_images, val.labels, 0)
        state.history.append(row)
        for cb in callbacks:
            cb.on_epoch_end(state, row)
        if state.step >= total_steps or state.should_stop:
            break
        if pause:
            if done_in_epoch:  # the net's own weights (the average was handed to it to measure)
                save(epoch, done_in_epoch, weights, epoch_rng)
            else:
                save(epoch + 1)
            paused = True
            state.stop(StopReason("trainer", "paused", f"paused after step {state.step} of "
                                  f"{total_steps} (epoch {row['epoch']} of {n_epochs}); "
                                  f"continue from {checkpoint}"))
            break
    if checkpoint is not None and not paused and not state.should_stop:
        save(n_epochs)  # finished: a second call returns this result without training again

    extras = ({"cuda_graph_captures": step_fn.captures}
              if isinstance(step_fn, GraphedStep) else None)
    return finish(state, data, evaluate, val_images, callbacks,
                  evaluate_test=evaluate_test and not paused,
                  train_seconds=train_seconds, t_start=t_start, extras=extras)


def finish(state: TrainState, data: SplitData,
           evaluate: Callable[..., Scores], val_images: torch.Tensor | None,
           callbacks: Sequence[Callback], *, evaluate_test: bool, train_seconds: float,
           t_start: float, extras: dict[str, Any] | None = None) -> TrainResult:
    """The end of a training loop (this trainer's or ``--engine keras``'s): final validation
    and test figures at the run's TTA, the :class:`TrainResult`, and ``on_train_end``."""
    config, model, device = state.config, state.model, state.device
    model.eval()
    val = data.val if data.val is not None and len(data.val) else None
    val_loss = val_acc = val_cal_loss = test_loss = test_acc = None
    last_row = state.history[-1] if state.history else {}
    if config.tta == 0 and last_row.get("val_loss") is not None:
        # same weights, same eval
        val_loss, val_acc = last_row["val_loss"], last_row["val_acc"]
        val_cal_loss = last_row.get("val_cal_loss")
    elif val is not None and val_images is not None:
        val_loss, val_acc, val_cal_loss = evaluate(val_images, val.labels, config.tta)
    if evaluate_test and len(data.test):
        # at the inference precision: the test accuracy a run records is what evaluate, predict
        # and serve reproduce (validation stays at the training precision: it is the tuner's
        # objective, measured once per trial)
        test_loss, test_acc, _ = evaluate(to_device_images(data.test.images, device),
                                          data.test.labels, config.tta, INFERENCE_PRECISION)
    result = TrainResult(
        model=model, config=config, classes=list(data.classes), mean=list(data.mean),
        std=list(data.std), history=state.history, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - t_start, val_loss=val_loss, val_acc=val_acc,
        test_loss=test_loss, test_acc=test_acc, stopped_early=state.stop_reason,
        data_sha256=data.data_sha256, source=data.source, precision=state.precision,
        device=str(device), val_cal_loss=val_cal_loss, extras=dict(extras or {}),
    )
    for cb in callbacks:
        cb.on_train_end(state, result)
    return result
