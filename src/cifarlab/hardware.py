"""Where and how tensors are computed: the device, the precision, and cuDNN's determinism.

Nothing here changes global state for longer than the ``with`` block that asks for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from cifarlab.config import DEVICE_PATTERN
from cifarlab.errors import ConfigError

__all__ = ["INFERENCE_PRECISION", "autocast", "cudnn_mode", "resolve_device",
           "resolve_precision"]

# Inference (evaluate, predict, serve, and the test accuracy a run records) runs in fp32 unless
# asked: bf16 results depend on how images are batched together, fp32's do not (to 1e-5), so one
# image gets the same probabilities from every interface. On the 2-core EPYC it costs 1.8x a
# bf16 pass (evaluate on 10,000 images with TTA 2: 64 s against 36 s).
INFERENCE_PRECISION = "fp32"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; a CUDA device must exist."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s).")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` picks bf16 where it pays: CUDA with bf16 support, or a CPU with bf16 units."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # Without AVX512-BF16/AMX, CPU bf16 is emulated and slower than fp32.
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str,
             cache: bool = True) -> AbstractContextManager[Any]:
    """bf16 autocast for ``precision == "bf16"``, else nothing; ``cache=False`` turns off the
    cast-weight cache, as a CUDA graph capture needs."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              cache_enabled=cache)
    return nullcontext()


@contextlib.contextmanager
def cudnn_mode(device: torch.device, deterministic: bool) -> Iterator[None]:
    """cuDNN's algorithm choice for the block, restored afterwards (a no-op off CUDA).

    Deterministic kernels make a CUDA run repeat bit for bit; benchmark mode lets cuDNN pick the
    fastest kernel per shape, which is faster and not repeatable.
    """
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cudnn
    saved = (flags.benchmark, flags.deterministic)
    flags.benchmark, flags.deterministic = not deterministic, deterministic
    try:
        yield
    finally:
        flags.benchmark, flags.deterministic = saved
