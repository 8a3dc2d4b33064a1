"""``cifarlab export RUN``: a trained run as a file other tools load, preprocessing included.

Both formats take what a camera gives: a float batch of RGB pixels in 0..255 at the run's image
size (N×H×W×3 for Keras, N×3×H×W for ONNX), and return class probabilities. The run's
normalization (its training-set mean and std) is inside the exported model, so a client needs
nothing but the file and the class names (``summary.json``). Test-time augmentation is not:
the exported model is the run at ``--tta 0``, which is what the tests compare it with.

- ``keras``: a ``.keras`` file that plain Keras 3 loads in safe mode (Keras models only).
- ``onnx``: through ``torch.onnx``'s ``torch.export``-based exporter (the ``cifarlab[onnx]``
  extra), PyTorch and Keras models alike; the file is checked in ONNX Runtime, when installed,
  against the model before it is written. A model the exporter cannot trace (data-dependent
  Python control flow) gets an error that quotes the exporter.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.files import atomic_write
from cifarlab.kerasnet import KerasModule, import_keras
from cifarlab.runs import LoadedRun, load_run

__all__ = ["FORMATS", "ExportError", "export_run"]

FORMATS = ("keras", "onnx")


class ExportError(CifarlabError):
    """A run that cannot be exported in the format asked for."""


def export_run(run_path: Path | str, fmt: str, out: Path | str | None = None) -> Path:
    """Write ``run_path`` as ``fmt``; returns the file (default ``RUN/model.<fmt>``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    run = load_run(run_path)
    path = Path(out) if out is not None else run.path / f"model.{fmt}"
    if fmt == "keras":
        if path.suffix != ".keras":
            raise ExportError(f"{path}: a Keras file must end in .keras.")
        _export_keras(run, path)
    else:
        _export_onnx(run, path)
    return path


def _export_keras(run: LoadedRun, path: Path) -> None:
    if not isinstance(run.model, KerasModule):
        raise ExportError(f"{run.path}: --format keras needs a Keras model; this run holds a "
                          f"PyTorch one ({run.config.model}). Use --format onnx.")
    keras = import_keras()
    inner = run.model.keras_model
    size = run.image_size
    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="scale")(image)
    x = keras.layers.Normalization(mean=run.mean, variance=[s * s for s in run.std],
                                   name="normalize")(x)
    y = inner(x)
    if not run.model.outputs_probabilities:
        y = keras.layers.Softmax(name="probabilities")(y)
    model = keras.Model(image, y, name=f"{inner.name}_export")

    def write(tmp: Path) -> None:
        keras_tmp = tmp.with_name(tmp.name + ".keras")  # Keras insists on the extension
        try:
            model.save(str(keras_tmp))
            os.replace(keras_tmp, tmp)
        finally:
            keras_tmp.unlink(missing_ok=True)

    atomic_write(path, write)


class _Exported(nn.Module):
    """The run's model with its preprocessing in front and a softmax behind."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((pixels - self.shift) * self.scale).float(), dim=1)


def _export_onnx(run: LoadedRun, path: Path) -> None:
    for extra in ("onnx", "onnxscript"):
        try:
            importlib.import_module(extra)
        except ImportError:
            raise ExportError(f"--format onnx needs {extra}: pip install 'cifarlab[onnx]'.") \
                from None
    wrapped = _Exported(run.model, run.mean, run.std).eval()
    size = run.image_size
    sample = torch.rand(2, 3, size, size) * 255

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(wrapped, (sample,), str(tmp), input_names=["image"],
                              output_names=["probabilities"], dynamo=True,
                              dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
                              external_data=False, verbose=False)
        except Exception as exc:
            raise ExportError(f"{run.path}: torch.onnx could not export this model "
                              f"({type(exc).__name__}: {str(exc)[:300]}).") from None
        _check_onnx(tmp, wrapped, sample)

    atomic_write(path, write)


def _check_onnx(path: Path, model: nn.Module, sample: torch.Tensor) -> None:
    """Run the file in ONNX Runtime (when installed) against the model itself."""
    try:
        ort: Any = importlib.import_module("onnxruntime")
    except ImportError:
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: sample.numpy()})[0]
    with torch.no_grad():
        want = model(sample).numpy()
    if not np.allclose(got, want, atol=1e-4):
        raise ExportError(f"the ONNX file disagrees with the model by "
                          f"{float(np.abs(got - want).max()):.2e}; not written.")
