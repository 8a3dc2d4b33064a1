"""A small model registry: ``register`` / ``create_model`` / ``list_models``.

Each entry carries the model's builder and the recipe overrides it trains best with, so that
``cifarlab train --model X`` starts from sensible hyperparameters for X.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.errors import ModelError
from cifarlab.kerasnet import KerasModule, is_keras_model, keras_cnn, keras_dense

__all__ = ["AirNet", "ModelSpec", "create_model", "default_config", "get_spec", "list_models",
           "register"]


@dataclass
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides of OptimConfig fields
    recipe_name: str = "default"  # what the default recipe is called
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)  # other named recipes

    @property
    def recipes(self) -> list[str]:
        return [self.recipe_name, *self.alternatives]

    def recipe_for(self, name: str | None = None) -> dict[str, Any]:
        """The named recipe (``None``: the default); an unknown name lists the valid ones."""
        if name is None or name == self.recipe_name:
            return self.recipe
        if name not in self.alternatives:
            raise ModelError(f"Unknown recipe {name!r} for {self.name}; valid recipes are: "
                             f"{', '.join(self.recipes)}.")
        return self.alternatives[name]


_REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str, description: str, recipe: dict[str, Any] | None = None,
    recipe_name: str = "default", alternatives: dict[str, dict[str, Any]] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, fn, description, recipe or {}, recipe_name,
                                    alternatives or {})
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"Unknown model {name!r}; valid models are: {', '.join(list_models())}."
        ) from None


# The recipe of a model cifarlab did not write (a .keras file, a builder): plain Nesterov SGD at
# batch 256 with a moderate rate, the tutorial network's recipe, which suits ordinary CNNs and
# MLPs; tune it from there.
OWN_MODEL_RECIPE: dict[str, Any] = dict(
    lr=2.2, momentum=0.9, weight_decay=0.0011, bias_scaler=1.0, label_smoothing=0.0, ema=False,
    epochs=10.0, batch_size=256)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def default_config(name: str, recipe: str | None = None) -> TrainConfig:
    """The config for model ``name`` with its default recipe, or the named one. A model that is
    not registered (a file or a builder) starts from :data:`OWN_MODEL_RECIPE`."""
    if name not in _REGISTRY and _looks_external(name):
        if recipe is not None:
            raise ModelError(f"--recipe {recipe!r}: named recipes belong to registered models; "
                             f"{name} starts from the generic recipe (set values with --config "
                             "or the options).")
        return TrainConfig(model=name).with_recipe(OWN_MODEL_RECIPE)
    return TrainConfig(model=name).with_recipe(get_spec(name).recipe_for(recipe))


def _looks_external(name: str) -> bool:
    return name.endswith(".keras") or ":" in name


def create_model(
    name: str, num_classes: int = 10, width: float = 1.0, image_size: int = 32,
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a registered model; an unknown name raises :class:`ModelError` listing valid ones.
    ``model_args`` go to the builder (only the Keras entries take any)."""
    spec = get_spec(name)
    try:
        model = spec.builder(num_classes=num_classes, width=width, image_size=image_size,
                             **(model_args or {}))
    except TypeError as exc:
        if model_args and "keyword argument" in str(exc):
            raise ModelError(f"model_args {sorted(model_args)}: {name} does not take them "
                             f"({exc}).") from None
        raise
    return KerasModule(model) if is_keras_model(model) else model


def _w(base: int, width: float) -> int:
    return max(1, round(base * width))


# ----------------------------------------------------------------------------------- tutorial


class TutorialNet(nn.Module):
    """The PyTorch 60-minute-blitz CIFAR-10 network: two convs, three linear layers."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32):
        super().__init__()
        c1, c2 = _w(6, width), _w(16, width)
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, _w(120, width))
        self.fc2 = nn.Linear(_w(120, width), _w(84, width))
        self.fc3 = nn.Linear(_w(84, width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@register(
    "tutorial",
    "PyTorch tutorial CNN (2 conv + 3 linear), the baseline",
    recipe=dict(lr=2.2, momentum=0.9, weight_decay=0.0011, bias_scaler=1.0, label_smoothing=0.0,
                ema=False, epochs=10.0, batch_size=256),
)
def tutorial(num_classes: int = 10, width: float = 1.0, image_size: int = 32) -> nn.Module:
    return TutorialNet(num_classes, width, image_size)


# ------------------------------------------------------------------------------------- airnet


class _Conv(nn.Conv2d):
    """3×3 'same' conv whose first in_channels filters start as identity (an implicit residual)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale and a learned shift (airbench): fewer useless params."""

    def __init__(self, c: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(c, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(cout)
        self.conv2 = _Conv(cout, cout)
        self.norm2 = _BatchNorm(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """airbench94-class CNN: a 2×2 patch-whitening stem, then 3 blocks of conv/pool/BN/GELU.

    The stem's weights are frozen at the whitening transform of training patches
    (:meth:`init_from_data`); its bias trains for the first part of the run only.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32):
        super().__init__()
        k = 2
        stem = 2 * 3 * k * k  # ± each eigenvector of the 12-dim patch covariance
        w1, w2, w3 = _w(64, width), _w(256, width), _w(256, width)
        self.whiten = nn.Conv2d(3, stem, kernel_size=k, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        self.act = nn.GELU()
        self.block1 = _Block(stem, w1)
        self.block2 = _Block(w1, w2)
        self.block3 = _Block(w2, w3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scale = 1 / 9  # logit temperature from airbench

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2×2 patches of ``images`` (N×3×H×W, already normalized)."""
        k = self.whiten.kernel_size
        x = images.float()
        c = x.shape[1]
        patches = x.unfold(2, k[0], 1).unfold(3, k[1], 1).transpose(1, 3).reshape(-1, c, *k)
        flat = patches.reshape(len(patches), -1).double()
        cov = flat.T @ flat / len(flat)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.T.flip(0)
        filters = (evecs / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(-1, c, *k)
        w = torch.cat((filters, -filters)).to(self.whiten.weight.dtype)
        self.whiten.weight.copy_(w)
        self._whiten_bias.zero_()

    @property
    def frozen_by_design(self) -> list[str]:
        """Parameters frozen on purpose (the doctor does not report them): the whitening
        filters and BatchNorm's unit scales."""
        return [n for n, p in self.named_parameters()
                if not p.requires_grad and (n == "whiten.weight" or ".norm" in n)]

    def on_epoch_start(self, progress: float) -> None:
        """Train the whitening bias for the first 30% of epochs only, then freeze it."""
        self._whiten_bias.requires_grad = progress < 0.3

    @property
    def _whiten_bias(self) -> torch.Tensor:
        assert self.whiten.bias is not None  # built with bias=True
        return self.whiten.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The stem always runs in fp32: its filters scale the weakest patch directions by up
        # to 1/sqrt(eps) ≈ 45, which amplifies bf16 input rounding into noise. It is tiny.
        with torch.autocast(x.device.type, enabled=False):
            x = self.act(self.whiten(x.float()))
        x = self.block3(self.block2(self.block1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.head(x) * self.scale


# airbench94_muon's recipe (Keller Jordan, 2024: 94.01% mean in 8 epochs on an A100) in
# cifarlab's units: Muon (lr 0.24, momentum 0.6, 3 Newton–Schulz steps, normalized filters) for
# the conv filters; SGD with Nesterov momentum 0.85 for the head and the biases. Its head lr
# (0.67 on logits scaled by 1/256 from a unit-std head) is 6.5 per 1024 examples on this
# model's head (1/9 scale, default init), its bias lr 64x that, its decay 2e-6 x batch per step
# 0.0157 per 1024 examples; the schedule decays linearly from the first step, with no lookahead.
# Batches of 1024, not airbench's 2000: on the 2-core EPYC 2000 trains at 600 img/s against 800
# (bench/recipes.py's machine), and a 2- and 3-epoch probe on the real data found Muon's lr of
# 0.24 as good at 1024 (0.12: -3.5 points, 0.32: +0.1).
AIRBENCH94_MUON = dict(optimizer="muon", muon_lr=0.24, muon_momentum=0.6, lr=6.5,
                       momentum=0.85, weight_decay=0.0157, bias_scaler=64.0, batch_size=1024,
                       epochs=8.0, label_smoothing=0.2, warmup_frac=0.0, lr_start=1.0,
                       lr_end=0.0, ema=False)


@register("airnet", "airbench94-class fast CNN (whitening stem, 64/256/256 × width)",
          recipe_name="airbench94", alternatives={"airbench94-muon": AIRBENCH94_MUON})
def airnet(num_classes: int = 10, width: float = 1.0, image_size: int = 32) -> nn.Module:
    return AirNet(num_classes, width, image_size)


# ----------------------------------------------------------------------------------- resnet18


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3×3 stem with stride 1 and no max-pool (He et al., 2016)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32):
        super().__init__()
        widths = [_w(b, width) for b in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers += [_BasicBlock(cin, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register(
    "resnet18",
    "ResNet-18, CIFAR variant (3x3 stem, no max-pool)",
    recipe=dict(lr=4.4, momentum=0.9, weight_decay=0.0022, bias_scaler=1.0, label_smoothing=0.1,
                epochs=30.0, batch_size=256, ema=False),
)
def resnet18(num_classes: int = 10, width: float = 1.0, image_size: int = 32) -> nn.Module:
    return ResNet18(num_classes, width, image_size)


# ----------------------------------------------------------------------------------- keras

# Keras 3 on the PyTorch backend (the optional extra `cifarlab[keras]`): built in
# cifarlab.kerasnet, trained like any other model here.
register("keras-dense", "Keras: the original notes' Flatten + Dense model (units, layers, "
         "dropout)", recipe=dict(OWN_MODEL_RECIPE, lr=1.0, epochs=10.0))(keras_dense)
register("keras-cnn", "Keras: Conv2D/BatchNormalization/MaxPooling2D blocks + Dense (filters, "
         "units, dropout)", recipe=dict(OWN_MODEL_RECIPE, lr=4.4, weight_decay=0.0022,
                                         label_smoothing=0.1, epochs=10.0))(keras_cnn)
