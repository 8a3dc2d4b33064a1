"""What the doctor examines: a model, the tensors it is fed, its loss and its optimizer.

:class:`Subject` works for any ``torch.nn.Module``; :func:`subject_from_config` builds one from a
cifarlab config and dataset, exactly as :func:`cifarlab.train.train` would feed it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.builders import build_model
from cifarlab.config import TrainConfig
from cifarlab.data import SplitData
from cifarlab.hardware import resolve_precision
from cifarlab.index import ContentIndex
from cifarlab.infer import Normalizer, to_device_images
from cifarlab.loader import DeviceLoader
from cifarlab.optim import build_optimizer
from cifarlab.step import training_step

__all__ = ["StepFn", "Subject", "default_step", "subject_from_config"]

StepFn = Callable[[nn.Module, torch.optim.Optimizer, Callable[..., torch.Tensor], torch.Tensor,
                   torch.Tensor], torch.Tensor]


def default_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[..., torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """One ordinary fp32 training step (the trainer's own, without autocast); returns the loss."""
    return training_step(model, optimizer, loss_fn, x, y, x.device, "fp32")


@dataclass
class Subject:
    """A model with its data as fed (``train_x``: N×C×H×W floats, after any normalization),
    its loss and optimizer.

    ``make_model`` builds a fresh model for the behavioural tests (default: a deep copy of
    ``model`` as it is now); ``optimizer`` is the configured optimizer, copied with the same
    hyperparameters for each test; ``step_fn`` is the user's own training step when it is not
    the ordinary one. ``images`` (N×H×W×C uint8) and ``pixel_sha256`` enable the dataset checks
    that need raw pixels (blank images, duplicates, leaks); ``test_*`` are for the leak checks.
    """

    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    num_classes: int
    loss_fn: Callable[..., torch.Tensor] = field(default_factory=nn.CrossEntropyLoss)
    optimizer: torch.optim.Optimizer | None = None
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    make_model: Callable[[], nn.Module] | None = None
    step_fn: StepFn = default_step
    mean: Sequence[float] | None = None  # normalization constants in use, if known (0-1 scale)
    std: Sequence[float] | None = None
    images: np.ndarray | None = None  # raw training images, N×H×W×C uint8
    labels_all: np.ndarray | None = None  # every training label (train_x may be a sample)
    pixel_sha256: np.ndarray | None = None
    test_images: np.ndarray | None = None
    test_pixel_sha256: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    filenames: Sequence[str] | None = None
    test_filenames: Sequence[str] | None = None
    # a saved fingerprint index over train then test rows (PreparedData.fingerprint_index):
    # the leak check reads it instead of building one
    fingerprints: ContentIndex | None = None
    intentionally_frozen: Sequence[str] = ()  # parameter names frozen on purpose
    batch_size: int = 32
    # the user's own training loader (a DataLoader or any iterable of (x, y) batches): the
    # doctor reads its first batches to check their order and preprocessing, as training sees
    # them (the other tensors above are what the user says the data is)
    loader: Iterable[Any] | None = None

    def fresh_model(self) -> nn.Module:
        return self.make_model() if self.make_model is not None else copy.deepcopy(self.model)

    def optimizer_for(self, model: nn.Module, lr_scale: float = 1.0) -> torch.optim.Optimizer:
        """The configured optimizer's class and hyperparameters, over ``model``'s parameters."""
        if self.optimizer is None:
            return torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                   lr=0.01 * lr_scale, momentum=0.9)
        # by position: a Keras model built twice names its layers differently (dense,
        # dense_1), never in another order
        fresh = list(model.parameters())
        where = {id(p): i for i, p in enumerate(self.model.parameters())}
        groups = []
        for g in self.optimizer.param_groups:
            params = [fresh[where[id(p)]] for p in g["params"] if id(p) in where]
            opts = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
            opts["lr"] = opts["lr"] * lr_scale
            groups.append({**opts, "params": params})
        return type(self.optimizer)(groups)  # type: ignore[call-arg]

    def context(self) -> dict[str, Any]:
        return {"model": type(self.model).__name__, "train_samples": len(self.train_x),
                "val_samples": 0 if self.val_x is None else len(self.val_x),
                "classes": self.num_classes, "input_shape": list(self.train_x.shape[1:]),
                "optimizer": type(self.optimizer).__name__ if self.optimizer else None}


def subject_from_config(config: TrainConfig, data: SplitData, sample: int = 4096,
                        val_sample: int = 2048) -> Subject:
    """A :class:`Subject` fed as :func:`cifarlab.trainer.train` feeds ``config``'s model:
    the same model (with its data-dependent init), normalization, loss, optimizer and step.
    ``train_x`` is a random sample of at most ``sample`` training images; the dataset checks see
    every training image (validation split included) and the saved fingerprint index."""
    cpu = torch.device("cpu")
    rng = np.random.default_rng(config.seed)
    train = data.train
    pick = np.sort(rng.permutation(len(train))[:sample])
    norm = Normalizer(data.mean, data.std, cpu)
    x = norm(to_device_images(train.images[pick], cpu))
    y = torch.from_numpy(train.labels[pick].astype(np.int64))
    vx = vy = None
    if data.val is not None and len(data.val):
        vpick = np.sort(rng.permutation(len(data.val))[:val_sample])
        vx = norm(to_device_images(data.val.images[vpick], cpu))
        vy = torch.from_numpy(data.val.labels[vpick].astype(np.int64))
    size = train.images.shape[1]
    n_classes = len(data.classes)
    whiten_pick = np.sort(rng.permutation(len(train))[:5000])
    whiten_x = norm(to_device_images(train.images[whiten_pick], cpu))

    def make_model() -> nn.Module:
        torch.manual_seed(config.seed)
        m = build_model(config, n_classes, size)
        init = getattr(m, "init_from_data", None)
        if callable(init):
            init(whiten_x)
        return m

    model = make_model()
    optimizer, _ = build_optimizer(model, config, total_steps=1000)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing, reduction="sum")
    frozen = tuple(getattr(model, "frozen_by_design", ()))
    precision = resolve_precision(config.precision, cpu)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer,
             loss_fn: Callable[..., torch.Tensor], x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        """The trainer's own step: bf16 autocast where the trainer would use it."""
        return training_step(model, optimizer, loss_fn, x, y, cpu, precision).float()

    # The dataset checks look at every training image the source has (the validation split is
    # training data too), through the prepared cache and its saved index when there is one.
    prepared = data.prepared
    full = prepared.train if prepared is not None else train
    fingerprints = None
    if prepared is not None and prepared.cache is not None:
        fingerprints = prepared.fingerprint_index("pixels")
    test = data.test
    return Subject(
        loader=_TrainerBatches(data, config, norm, cpu),
        model=model, train_x=x, train_y=y, num_classes=n_classes, loss_fn=loss_fn,
        optimizer=optimizer, val_x=vx, val_y=vy, make_model=make_model, step_fn=step,
        mean=list(data.mean), std=list(data.std), images=full.images,
        labels_all=full.labels, pixel_sha256=full.pixel_sha256,
        test_images=test.images, test_pixel_sha256=test.pixel_sha256, test_labels=test.labels,
        filenames=full.filenames, test_filenames=test.filenames,
        fingerprints=fingerprints, intentionally_frozen=frozen, batch_size=32,
    )


class _TrainerBatches:
    """The first epoch's batches exactly as cifarlab's trainer draws them (its DeviceLoader:
    order, augmentation, normalization), built only when the doctor reads them."""

    def __init__(self, data: SplitData, config: TrainConfig, norm: Normalizer,
                 device: torch.device):
        self.data, self.config, self.norm, self.device = data, config, norm, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(DeviceLoader(self.data.train, self.config, self.norm, self.device))
