"""``train(config, callbacks) -> TrainResult`` and ``evaluate()``: the fast trainer.

Built the way the fastest CIFAR-10 trainers are (airbench, Keller Jordan 2024): the whole
dataset is one uint8 tensor on the training device, augmentation runs on whole batches there,
Nesterov SGD with decoupled hyperparameters and a triangular schedule, label smoothing,
lookahead-style weight averaging, channels_last, bf16 autocast where the hardware has bf16 units,
and flip/translate test-time augmentation. Measured on a 2-core EPYC: see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.data import Dataset, SplitData, load_data
from cifarlab.errors import ConfigError
from cifarlab.models import create_model

__all__ = [
    "Callback",
    "EpochTable",
    "TrainResult",
    "TrainState",
    "autocast",
    "build_optimizer",
    "evaluate",
    "predict_logits",
    "resolve_device",
    "resolve_precision",
    "train",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ hardware


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use --device cpu.")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` picks bf16 where it pays: CUDA with bf16 support, or a CPU with bf16 units."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # Without AVX512-BF16/AMX, CPU bf16 is emulated and slower than fp32.
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ------------------------------------------------------------------------- the on-device loader


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


class DeviceLoader:
    """Iterates over augmented, normalized batches of a dataset held as one tensor on a device.

    There is no per-sample Python and no worker process: each step gathers a batch of uint8
    images, normalizes, mirrors, translates and cuts out the whole batch at once.
    """

    def __init__(self, ds: Dataset, cfg: TrainConfig, norm: Normalizer, device: torch.device):
        self.images = to_device_images(ds.images, device)
        self.labels = torch.from_numpy(ds.labels).to(device)
        self.norm, self.device, self.aug = norm, device, cfg.aug
        self.batch_size = min(cfg.optim.batch_size, len(ds))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # Alternating flip (airbench): a fixed random half of the images is mirrored on even
        # epochs and the other half on odd ones, so every image is seen both ways in 2 epochs.
        self.flip_base = (torch.rand(len(ds), generator=self.gen) < 0.5).to(device)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.labels), generator=self.gen).to(self.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            yield self._augment(self.images[idx], idx), self.labels[idx]
        self.epoch += 1

    def _augment(self, x8: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = self.norm(x8)  # B×C×H×W float
        b, _, h, w = x.shape
        if self.aug.flip:
            mask = self.flip_base[idx] ^ bool(self.epoch % 2)
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        r = self.aug.translate
        if r > 0:
            xp = F.pad(x, (r, r, r, r), mode="reflect")
            dy = torch.randint(0, 2 * r + 1, (b,), generator=self.gen).to(self.device)
            dx = torch.randint(0, 2 * r + 1, (b,), generator=self.gen).to(self.device)
            rows = (dy[:, None] + torch.arange(h, device=self.device))[:, :, None]  # B×H×1
            cols = (dx[:, None] + torch.arange(w, device=self.device))[:, None, :]  # B×1×W
            bidx = torch.arange(b, device=self.device)[:, None, None]
            x = xp[bidx, :, rows, cols].permute(0, 3, 1, 2)  # B×H×W×C gathered -> B×C×H×W
        if self.aug.cutout > 0:
            s = self.aug.cutout
            cy = torch.randint(0, h, (b, 1, 1), generator=self.gen).to(self.device)
            cx = torch.randint(0, w, (b, 1, 1), generator=self.gen).to(self.device)
            ys = torch.arange(h, device=self.device).view(1, h, 1)
            xs = torch.arange(w, device=self.device).view(1, 1, w)
            hole = ((ys - cy).abs() * 2 < s) & ((xs - cx).abs() * 2 < s)  # B×H×W
            x = x * (~hole).unsqueeze(1)
        return x.contiguous(memory_format=torch.channels_last)


# -------------------------------------------------------------------------------- optimizer


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Nesterov SGD in airbench's decoupled parametrization, and the triangular schedule.

    With a summed loss and Nesterov momentum m, plain SGD steps are about (1 + 1/(1-m)) times the
    gradient; dividing by that (per 1024 examples) makes ``lr`` independent of momentum, and
    setting PyTorch's weight_decay to wd/lr makes the decay independent of ``lr``.
    """
    o = cfg.optim
    kilostep = 1024 * (1 + 1 / (1 - o.momentum))
    lr = o.lr / kilostep
    wd = o.weight_decay * o.batch_size / kilostep
    norm_biases = [
        m.bias for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    ]
    ids = {id(p) for p in norm_biases}
    others = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [dict(params=others, lr=lr, weight_decay=wd / lr)]
    if norm_biases:
        lr_b = lr * o.bias_scaler
        groups.append(dict(params=norm_biases, lr=lr_b, weight_decay=wd / lr_b))
    opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return opt, _triangle(opt, cfg, total_steps)


def _triangle(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``lr_start`` to 1 over ``warmup_frac``, then linear to ``lr_end``."""
    o = cfg.optim
    peak = max(1, int(o.warmup_frac * total))

    def factor(step: int) -> float:
        if step < peak:
            return o.lr_start + (1 - o.lr_start) * step / peak
        return 1 + (o.lr_end - 1) * min(1.0, (step - peak) / max(1, total - peak))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------ callbacks


@dataclass
class TrainState:
    """What callbacks see. Set ``should_stop`` (with a ``stop_reason``) to end training early."""

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
    should_stop: bool = False
    stop_reason: str | None = None


class Callback:
    """Hooks into :func:`train`. Subclass and override what you need; all are no-ops here.

    ``on_step_end`` receives the step's loss as a 0-d tensor: calling ``.item()`` on it forces a
    device sync, so monitors should do that only every k steps.
    """

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(
        self, state: TrainState, loss: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, state: TrainState, result: TrainResult) -> None: ...


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
    stopped_early: str | None
    data_sha256: str
    source: str
    precision: str
    device: str
    run_dir: Path | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)  # the doctor's, if it watched


# -------------------------------------------------------------------------------- evaluation


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


def evaluate(
    model: nn.Module,
    ds: Dataset,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    tta: int = 0,
) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of ``model`` on ``ds``; plain CE, no label smoothing."""
    device = torch.device(device)
    if len(ds) == 0:
        return float("nan"), float("nan")
    images = to_device_images(ds.images, torch.device("cpu"))  # moved to the device per batch
    return _eval_tensor(model, images, ds.labels, Normalizer(mean, std, device), device,
                        precision, tta)


# ---------------------------------------------------------------------------------- training


class _Lookahead:
    """Weight averaging that is copied back into the net (airbench's lookahead-EMA)."""

    def __init__(self, model: nn.Module):
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for (_, avg), cur in zip(self.avg.items(), model.state_dict().values(), strict=True):
            if cur.dtype.is_floating_point:
                avg.lerp_(cur, 1 - decay)
                cur.copy_(avg)


def train(
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    data: SplitData | None = None,
    run_dir: Path | str | None = None,
    evaluate_test: bool = True,
    progress: bool = True,
    doctor: bool = True,
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` and return the model with its metrics.

    Per-step and per-epoch metrics reach ``callbacks``; a callback may stop training by setting
    ``state.should_stop``. With ``run_dir``, a run folder is written as training goes (see
    :mod:`cifarlab.runs`). The test split is evaluated only at the end, and only when
    ``evaluate_test`` is true. With ``doctor`` (the default) a
    :class:`cifarlab.doctor.DoctorMonitor` watches the run, stops it on divergence, and its
    findings land in ``result.findings`` (unless ``callbacks`` already hold a monitor).
    Raises :class:`ConfigError` for invalid settings.
    """
    from tqdm.auto import tqdm

    from cifarlab import runs

    config.validate()
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    data = data if data is not None else load_data(config.data)
    if len(data.train) == 0:
        raise ConfigError("The training split is empty.")

    torch.manual_seed(config.seed)
    size = data.train.images.shape[1]
    model = create_model(config.model, len(data.classes), config.width, size).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    norm = Normalizer(data.mean, data.std, device)
    loader = DeviceLoader(data.train, config, norm, device)
    steps_per_epoch = max(1, len(loader))
    total_steps = max(1, math.ceil(steps_per_epoch * config.optim.epochs))
    optimizer, scheduler = build_optimizer(model, config, total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing, reduction="sum")
    state = TrainState(config, model, optimizer, device, precision, total_steps, steps_per_epoch)
    run_path = runs.start_run(run_dir, config) if run_dir is not None else None
    callbacks = list(callbacks)
    monitor = next((cb for cb in callbacks if type(cb).__name__ == "DoctorMonitor"), None)
    if doctor and monitor is None:
        from cifarlab.doctor.monitor import DoctorMonitor

        monitor = DoctorMonitor(num_classes=len(data.classes))
        callbacks.append(monitor)
    for cb in callbacks:
        cb.on_train_start(state)

    t_train = time.perf_counter()
    init = getattr(model, "init_from_data", None)
    if callable(init):
        # A seeded random sample: splits are stored sorted by class, so a prefix would be
        # one class only and would whiten for, say, airplanes and sky.
        rng = np.random.default_rng(config.seed)
        pick = np.sort(rng.permutation(len(data.train))[:5000])
        init(norm(to_device_images(data.train.images[pick], device)))
    train_seconds = time.perf_counter() - t_train

    lookahead: _Lookahead | None = None
    ema_start = int(config.optim.ema_start_frac * total_steps)
    val_images = to_device_images(data.val.images, device) if data.val is not None else None
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(n_epochs):
        state.epoch = epoch
        t0 = time.perf_counter()
        hook = getattr(model, "on_epoch_start", None)
        if callable(hook):
            hook(epoch / n_epochs)
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(total=min(steps_per_epoch, total_steps - state.step), leave=False,
                   desc=f"epoch {epoch + 1}/{n_epochs}", unit="step",
                   disable=None if progress else True)
        for inputs, labels in loader:  # type: ignore[attr-defined]
            with autocast(device, precision):
                loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state.step += 1
            loss_sum += loss.detach().float()
            seen += len(labels)
            if config.optim.ema and state.step >= ema_start and state.step % 5 == 0:
                if lookahead is None:
                    lookahead = _Lookahead(model)
                else:
                    # decay warms up over training: move fast early, average hard at the end
                    rho = 0.95**5 * (state.step / total_steps) ** 3
                    lookahead.update(model, rho)
            for cb in callbacks:
                cb.on_step_end(state, loss.detach() / len(labels), inputs, labels)
            bar.update(1)
            if state.step >= total_steps or state.should_stop:
                break
        bar.close()
        if lookahead is not None:
            lookahead.update(model, 1.0)  # hand the averaged weights back to the net
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": (loss_sum / max(1, seen)).item(),
            "val_loss": None,
            "val_acc": None,
            "seconds": round(epoch_seconds, 3),
            "images_per_second": round(seen / epoch_seconds, 1) if epoch_seconds > 0 else None,
        }
        last = state.step >= total_steps or state.should_stop
        if val_images is not None and ((epoch + 1) % config.eval_every == 0 or last):
            row["val_loss"], row["val_acc"] = _eval_tensor(
                model, val_images, data.val.labels, norm, device, precision, 0)  # type: ignore[union-attr]
        state.history.append(row)
        if run_path is not None:
            runs.write_metrics(run_path, state.history)
        for cb in callbacks:
            cb.on_epoch_end(state, row)
        if state.step >= total_steps or state.should_stop:
            break

    val_loss = val_acc = test_loss = test_acc = None
    last_row = state.history[-1] if state.history else {}
    if config.tta == 0 and last_row.get("val_loss") is not None:
        val_loss, val_acc = last_row["val_loss"], last_row["val_acc"]  # same weights, same eval
    elif val_images is not None:
        val_loss, val_acc = _eval_tensor(model, val_images, data.val.labels, norm, device,  # type: ignore[union-attr]
                                         precision, config.tta)
    if evaluate_test and len(data.test):
        test_loss, test_acc = _eval_tensor(model, to_device_images(data.test.images, device),
                                           data.test.labels, norm, device, precision, config.tta)
    result = TrainResult(
        model=model, config=config, classes=list(data.classes), mean=list(data.mean),
        std=list(data.std), history=state.history, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - t_start, val_loss=val_loss, val_acc=val_acc,
        test_loss=test_loss, test_acc=test_acc, stopped_early=state.stop_reason,
        data_sha256=data.data_sha256, source=data.source, precision=precision,
        device=str(device), run_dir=run_path,
    )
    for cb in callbacks:
        cb.on_train_end(state, result)
    if monitor is not None:
        result.findings = [f.to_dict() for f in monitor.report.findings]  # type: ignore[attr-defined]
    if run_path is not None:
        runs.finish_run(run_path, result)
    return result


def _eval_tensor(
    model: nn.Module, images: torch.Tensor, labels: np.ndarray, norm: Normalizer,
    device: torch.device, precision: str, tta: int,
) -> tuple[float, float]:
    logits = predict_logits(model, images, norm, device, precision, tta)
    y = torch.from_numpy(np.asarray(labels))
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


class EpochTable(Callback):
    """Prints one fixed-width row per epoch (airbench style), around any progress bar."""

    HEADER = f"{'epoch':>6} {'step':>6} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} {'seconds':>8} {'img/s':>7}"

    def __init__(self, write: Any = None):
        from tqdm.auto import tqdm

        self.write = write or tqdm.write

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
