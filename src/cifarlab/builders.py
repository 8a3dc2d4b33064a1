"""What ``--model`` names, built: a registered model, a ``.keras`` file, or a builder function.

- a registered name (``cifarlab models``): built by the registry, ``model_args`` going to the
  builder of the entries that take any;
- ``path/to/model.keras``: loaded in Keras's safe mode, its weights the starting point;
- ``path/to/file.py:build_model`` or ``package.module:build_model``: called as
  ``build_model(input_shape=(H, W, 3), num_classes=C, **model_args)``; it returns a Keras model
  or a ``torch.nn.Module`` taking N×3×H×W batches. It is the user's own code, run as such.

Every model comes back as a ``torch.nn.Module`` (Keras models wrapped in
:class:`cifarlab.kerasnet.KerasModule`), and :func:`rebuild` makes the same one again from a
run folder's records: Keras models from their saved config (safe mode), builders by calling them
again with the recorded arguments.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.errors import ModelError
from cifarlab.kerasnet import (
    KerasModule,
    import_keras,
    is_keras_model,
    keras_seed,
    load_keras_file,
    model_from_config,
)
from cifarlab.models import create_model, is_registered, list_models

__all__ = ["build_model", "display_name", "model_kind", "model_source", "rebuild", "require"]


def model_kind(name: str) -> str:
    """``registry``, ``keras-file`` or ``builder``; anything else is a :class:`ModelError` that
    lists what ``--model`` accepts."""
    if is_registered(name):
        return "registry"
    if name.endswith(".keras"):
        return "keras-file"
    if ":" in name:
        target, _, func = name.rpartition(":")
        if target and func.isidentifier():
            return "builder"
    raise ModelError(f"Unknown model {name!r}; use a registered name ({', '.join(list_models())}),"
                     " a .keras file, or a builder such as models.py:build_model or "
                     "package.module:build_model.")


def display_name(model: str) -> str:
    """A short, URL- and folder-safe name for ``--model``: a registered name as it is, a
    builder by its function, a ``.keras`` file by its stem (``nets.py:build`` -> ``build``)."""
    if ":" in model:
        model = model.rpartition(":")[2]
    elif model.endswith(".keras"):
        model = Path(model).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "model"


def require(name: str) -> None:
    """Fail now, with what to install, when ``name`` is a Keras model and Keras is missing
    (before any data is read). A builder's needs show when it is imported."""
    kind = model_kind(name)
    if kind == "keras-file" or (kind == "registry" and name.startswith("keras-")):
        import_keras()


def build_model(config: TrainConfig, num_classes: int, image_size: int) -> nn.Module:
    """The model ``config.model`` names, for ``num_classes`` classes of ``image_size`` pixels,
    seeded by ``config.seed`` (Keras's own generators too)."""
    kind = model_kind(config.model)
    if kind == "registry":
        seeded = keras_seed(config.seed) if config.model.startswith("keras-") \
            else contextlib.nullcontext()
        with seeded:
            return create_model(config.model, num_classes, config.width, image_size,
                                config.model_args)
    if kind == "keras-file":
        if config.model_args:
            raise ModelError(f"model_args {sorted(config.model_args)}: a .keras file is a "
                             "finished model; use a builder to set its arguments.")
        model = KerasModule(load_keras_file(config.model))
        _check_shapes(model, config.model, num_classes, image_size)
        return model
    return _call_builder(config, num_classes, image_size)


def model_source(config: TrainConfig) -> dict[str, Any]:
    """What a run folder records about where its model came from."""
    kind = model_kind(config.model)
    out: dict[str, Any] = {"kind": kind, "name": config.model, "model_args": config.model_args}
    if kind == "keras-file" or (kind == "builder" and _builder_file(config.model) is not None):
        path = Path(config.model) if kind == "keras-file" else _builder_file(config.model)
        assert path is not None
        out["path"] = str(path.resolve())
        out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def rebuild(config: TrainConfig, num_classes: int, image_size: int,
            keras_config: dict[str, Any] | None, source: dict[str, Any] | None) -> nn.Module:
    """The architecture of a finished run, with fresh weights. A Keras model comes from its
    saved config (safe mode), so the run folder alone rebuilds it; where that config needs the
    builder's code (a custom layer, a ``Lambda``), the builder recorded in ``source`` is imported
    or called again. Other models: the registry, or the builder called again."""
    kind = (source or {}).get("kind") or model_kind(config.model)
    if kind == "builder" and source and source.get("path"):
        config = config.with_values({"model": f"{source['path']}:{_func_name(config.model)}"})
    if keras_config is not None:
        try:
            return KerasModule(model_from_config(keras_config))
        except ModelError:
            if kind != "builder":
                raise
        try:  # the builder's module may register the custom layers the config names
            _load_callable(config.model)
            return KerasModule(model_from_config(keras_config))
        except ModelError:
            pass
    elif kind == "keras-file":
        raise ModelError("the run has no keras_model.json to rebuild its Keras model from.")
    return build_model(config, num_classes, image_size)


# --------------------------------------------------------------------------- builders


def _func_name(ref: str) -> str:
    return ref.rpartition(":")[2]


def _builder_file(ref: str) -> Path | None:
    target = ref.rpartition(":")[0]
    return Path(target) if target.endswith(".py") else None


def _load_callable(ref: str) -> Any:
    target, _, func = ref.rpartition(":")
    file = _builder_file(ref)
    os.environ.setdefault("KERAS_BACKEND", "torch")  # a builder that imports keras gets torch
    if file is not None:
        if not file.is_file():
            raise ModelError(f"--model {ref}: no such file {file}.")
        digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
        name = f"cifarlab_builder_{digest}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, file)
            if spec is None or spec.loader is None:
                raise ModelError(f"--model {ref}: cannot import {file}.")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before exec: dataclasses and Keras registration look it up
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise ModelError(f"--model {ref}: importing {file} failed "
                                 f"({type(exc).__name__}: {exc}).") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"--model {ref}: cannot import module {target!r} ({exc}).") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ModelError(f"--model {ref}: {target} has no function {func!r}.")
    return fn


def _call_builder(config: TrainConfig, num_classes: int, image_size: int) -> nn.Module:
    ref = config.model
    fn = _load_callable(ref)
    kwargs = {"input_shape": (image_size, image_size, 3), "num_classes": num_classes,
              **config.model_args}
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params and not takes_any)
    if unknown:
        raise ModelError(f"--model {ref}: the builder does not take {', '.join(unknown)}; it "
                         f"must accept input_shape and num_classes, and every model_args key "
                         f"(it takes: {', '.join(params) or 'nothing'}).")
    torch.manual_seed(config.seed)
    seeded = keras_seed(config.seed) if "keras" in sys.modules else contextlib.nullcontext()
    try:
        with seeded:
            model = fn(**kwargs)
    except Exception as exc:
        raise ModelError(f"--model {ref}: the builder raised {type(exc).__name__}: {exc}") \
            from exc
    if is_keras_model(model):
        wrapped: nn.Module = KerasModule(model)
    elif isinstance(model, nn.Module):
        wrapped = model
    else:
        raise ModelError(f"--model {ref}: the builder returned {type(model).__name__}; it must "
                         "return a Keras model or a torch.nn.Module.")
    _check_shapes(wrapped, ref, num_classes, image_size)
    return wrapped


def _check_shapes(model: nn.Module, ref: str, num_classes: int, image_size: int) -> None:
    """One forward pass of two blank images: the model must take 3×H×W and give one score per
    class, or the error says which."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, image_size, image_size))
    except Exception as exc:
        raise ModelError(f"--model {ref}: the model cannot take a batch of {image_size}×"
                         f"{image_size} RGB images ({type(exc).__name__}: {exc}).") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"--model {ref}: the model's output for 2 images is {shape}; it must "
                         f"be (2, {num_classes}): one score per class of the dataset.")
