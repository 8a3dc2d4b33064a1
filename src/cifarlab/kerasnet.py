"""Keras 3 models in cifarlab: the bridge that makes one an ordinary PyTorch module.

On the PyTorch backend (``KERAS_BACKEND=torch``) a Keras model already is a ``torch.nn.Module``
whose variables are torch parameters. :class:`KerasModule` wraps it so the rest of cifarlab sees
what it sees for any model:

- **layout**: cifarlab's batches are N×C×H×W in ``channels_last`` memory, which *is* N×H×W×C in
  memory, so the permute to the Keras layout is a view, not a copy;
- **mode**: ``module.train()`` / ``eval()`` reach Keras's ``training`` argument (BatchNorm,
  Dropout);
- **speed**: the model's graph runs with PyTorch's fused kernels for the layers
  :mod:`cifarlab.kerasfast` knows (``fast=False`` runs every layer as Keras does);
- **outputs**: a model that ends in a softmax hands back log-probabilities (clipped as Keras's
  own cross-entropy clips them), so cifarlab's cross-entropy on "logits" is Keras's
  categorical cross-entropy, and the softmax of the output is the model's own probabilities;
- **weights**: ``state_dict`` lists each Keras weight once, in Keras's order, keyed by
  position and path (a Keras model registers each variable under two torch names); the RNG
  state of its Dropout layers is not a weight and is not saved.

Keras is an optional extra: nothing here imports it until a Keras model is asked for, and
:func:`import_keras` says what to install when it is missing. Files are loaded in Keras's safe
mode only: a ``.keras`` file that holds Python code (a ``Lambda`` layer) is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from cifarlab.errors import ModelError
from cifarlab.kerasfast import has_graph, run_graph

__all__ = [
    "KERAS_HINT",
    "KerasModule",
    "import_keras",
    "is_keras_model",
    "keras_cnn",
    "keras_dense",
    "keras_seed",
    "load_keras_file",
    "model_from_config",
]

KERAS_HINT = "pip install 'cifarlab[keras]'"
_PROBABILITY_FLOOR = 1e-7  # keras.backend.epsilon(): what Keras's cross-entropy clips to


def import_keras() -> Any:
    """The ``keras`` module on the PyTorch backend; a :class:`ModelError` that says what to
    install, or which backend is in the way."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        keras = importlib.import_module("keras")
    except ImportError:
        raise ModelError(f"Keras models need Keras 3: {KERAS_HINT}.") from None
    if not hasattr(keras, "config"):
        raise ModelError(f"{getattr(keras, '__file__', 'a module named keras')} hides the Keras "
                         "package; rename that file (or run from another folder).")
    backend = keras.config.backend()
    if backend != "torch":
        raise ModelError(f"Keras is running on the {backend!r} backend; cifarlab trains Keras "
                         "models on PyTorch. Set KERAS_BACKEND=torch before anything imports "
                         "keras (cifarlab sets it when it imports keras first).")
    return keras


@contextlib.contextmanager
def keras_seed(seed: int) -> Iterator[None]:
    """Keras's global seed (its initializers and Dropout draw from it) set to ``seed`` for a
    model's construction; the Python and NumPy generators that ``keras.utils.set_random_seed``
    also reseeds are handed back as they were (torch's stays seeded, as the trainer seeds it)."""
    keras = import_keras()
    py, np_state = random.getstate(), np.random.get_state()
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def is_keras_model(obj: Any) -> bool:
    """True for a Keras model, without importing Keras when nobody has."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


class KerasModule(nn.Module):
    """A Keras model as a cifarlab model: N×C×H×W in, logits (or log-probabilities) out."""

    def __init__(self, keras_model: Any, fast: bool = True):
        super().__init__()
        self.keras_model = keras_model  # an nn.Module on the torch backend: its params register
        self.outputs_probabilities = _ends_in_softmax(keras_model)
        # the model's graph with PyTorch's fused kernels for the layers it knows (kerasfast)
        self.fast = fast and has_graph(keras_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc = x.permute(0, 2, 3, 1)
        if self.fast:
            out = run_graph(self.keras_model, nhwc, self.training)
        else:
            out = self.keras_model(nhwc, training=self.training)
        if self.outputs_probabilities:
            return torch.log(out.float().clamp(_PROBABILITY_FLOOR, 1 - _PROBABILITY_FLOOR))
        return out

    # ---------------------------------------------------------------- weights, once each

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        keep_vars = kwargs.get("keep_vars", False)
        out: OrderedDict[str, Any] = OrderedDict()
        for i, v in enumerate(self.keras_model.weights):
            t = v.value
            out[f"{i:04d}/{v.path}"] = t if keep_vars else t.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        variables = list(self.keras_model.weights)
        if len(state_dict) != len(variables):
            raise RuntimeError(f"expected {len(variables)} Keras weights, got "
                               f"{len(state_dict)}")
        # by position: Keras numbers layer names per process (dense, dense_1...), so the same
        # architecture built twice can have other paths, never another order
        for (key, tensor), v in zip(sorted(state_dict.items()), variables, strict=True):
            if tuple(tensor.shape) != tuple(v.shape):
                raise RuntimeError(f"{key}: shape {tuple(tensor.shape)} does not fit "
                                   f"{v.path} {tuple(v.shape)}")
            v.assign(tensor.to(v.value.device, v.value.dtype))
        return _IncompatibleKeys([], [])

    def norm_biases(self) -> list[nn.Parameter]:
        """The BatchNormalization offsets (``beta``): the optimizer's bias-scaled group."""
        keras = import_keras()
        return [layer.beta.value for layer in _all_layers(self.keras_model)
                if isinstance(layer, keras.layers.BatchNormalization)
                and getattr(layer, "beta", None) is not None]

    @property
    def frozen_by_design(self) -> list[str]:
        """Keras's non-trainable variables (BatchNormalization's moving statistics, Dropout's
        RNG state, layers the user set ``trainable=False``): torch parameters without
        gradients, on purpose. The doctor does not report them as frozen by mistake."""
        fixed = {id(v.value) for v in self.keras_model.variables if not v.trainable}
        return [n for n, p in self.named_parameters() if id(p) in fixed]

    def architecture(self) -> dict[str, Any]:
        """The Keras model's own config (JSON, no code): what a run folder keeps."""
        return dict(json.loads(self.keras_model.to_json()))


def _all_layers(model: Any) -> list[Any]:
    return list(model._flatten_layers(include_self=False, recursive=True))


def _ends_in_softmax(model: Any) -> bool:
    layers = [layer for layer in getattr(model, "layers", []) if layer.weights or
              type(layer).__name__ in ("Softmax", "Activation")]
    if not layers:
        return False
    last = layers[-1]
    if type(last).__name__ == "Softmax":
        return True
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") == "softmax"


# --------------------------------------------------------------------------- loading


def load_keras_file(path: Path | str) -> Any:
    """A ``.keras`` file, in Keras's safe mode: no Python code in the file is run."""
    keras = import_keras()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such .keras file.")
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
            raise ModelError(
                f"{path}: refused: loading it would run Python code stored in the file (a "
                "`Lambda` layer or a function saved by bytecode). cifarlab loads only safe "
                "files. Write the layer as a registered custom layer in a builder file and "
                "pass --model FILE.py:build_model instead.") from None
        raise ModelError(f"{path}: not a loadable Keras model ({exc}).") from None
    except Exception as exc:  # zip errors, unknown layer classes, h5 errors
        raise ModelError(f"{path}: not a loadable Keras model ({type(exc).__name__}: "
                         f"{exc}).") from None


def model_from_config(config: dict[str, Any]) -> Any:
    """A Keras model rebuilt from its JSON config (safe mode), with fresh weights."""
    keras = import_keras()
    try:
        return keras.models.model_from_json(json.dumps(config))
    except Exception as exc:
        raise ModelError(f"cannot rebuild the Keras model from its saved config ({exc}).") \
            from None


# --------------------------------------------------------------------------- registry models


def keras_dense(num_classes: int = 10, width: float = 1.0, image_size: int = 32,
                units: int = 512, layers: int = 2, dropout: float = 0.2) -> Any:
    """The original notes' model: Flatten, then Dense layers with ReLU and dropout."""
    keras = import_keras()
    L = keras.layers
    stack: list[Any] = [keras.Input((image_size, image_size, 3)), L.Flatten()]
    for _ in range(int(layers)):
        stack += [L.Dense(max(1, round(units * width)), activation="relu")]
        if dropout > 0:
            stack.append(L.Dropout(dropout))
    stack.append(L.Dense(num_classes))
    return keras.Sequential(stack, name="keras_dense")


def keras_cnn(num_classes: int = 10, width: float = 1.0, image_size: int = 32,
              filters: int = 32, units: int = 128, dropout: float = 0.25) -> Any:
    """A small Conv2D/MaxPooling2D/Dense network in the Keras tutorial's style, with
    BatchNormalization after each convolution."""
    keras = import_keras()
    L = keras.layers

    def block(n: int) -> list[Any]:
        return [L.Conv2D(n, 3, padding="same", use_bias=False), L.BatchNormalization(),
                L.Activation("relu"), L.Conv2D(n, 3, padding="same", use_bias=False),
                L.BatchNormalization(), L.Activation("relu"), L.MaxPooling2D()]

    f = max(1, round(filters * width))
    stack: list[Any] = [keras.Input((image_size, image_size, 3)), *block(f), *block(2 * f),
                        *block(4 * f), L.GlobalAveragePooling2D()]
    if dropout > 0:
        stack.append(L.Dropout(dropout))
    stack += [L.Dense(max(1, round(units * width)), activation="relu"), L.Dense(num_classes)]
    return keras.Sequential(stack, name="keras_cnn")
