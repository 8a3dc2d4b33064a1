"""A fast path for Keras models: each standard layer run as the PyTorch kernel it stands for.

Keras 3's PyTorch backend runs a layer through backend ops written for every framework:
BatchNormalization as six elementwise passes, a cast of every input to the layer's dtype (which
undoes bf16 autocast between layers), and layout transposes around each convolution. Measured
on the 2-core EPYC, ``keras-cnn`` trained at 706 images/s where the same network written in
PyTorch trained at 2,445.

This module runs the Keras model's own graph (its functional structure, its own variables) but
calls, for each layer it knows, the fused PyTorch kernel on views of the Keras weights:
``F.conv2d`` on the kernel permuted to out×in×kH×kW, ``native_batch_norm`` updating Keras's
moving statistics the Keras way (biased batch variance, Keras's momentum), ``F.linear``,
``F.max_pool2d`` and so on. Activations stay N×H×W×C, as Keras has them; the N×C×H×W views the
kernels see are ``channels_last`` in memory, so nothing is copied. Gradients reach the Keras
variables through the views, so training this path trains the Keras model, and its outputs
equal Keras's own (tested to 1e-5).

A layer it does not know runs as Keras runs it; a model that is not a graph (a subclassed
``keras.Model`` with its own ``call``) runs entirely as Keras runs it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["coverage", "has_graph", "run_graph"]

# A converted layer: called as op(layer, *inputs, training=..., **kwargs). It takes the layer as
# an argument rather than holding it, so the plans below can be cached per layer object without
# keeping layers alive, and a deep copy of a model runs on its own layers, never the original's.
Op = Callable[..., torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "gelu": F.gelu,  # Keras's default: the exact form
    "silu": F.silu,
    "swish": F.silu,
    "elu": F.elu,
    "softplus": F.softplus,
}


def _activation(layer: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    fn = getattr(layer, "activation", None)
    if fn is None:
        return _ACTIVATIONS["linear"]
    return _ACTIVATIONS.get(getattr(fn, "__name__", ""))


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _tuple2(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's "same": the output has ceil(size/s) positions, extra padding at the end."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _conv2d(layer: Any) -> Op | None:
    act = _activation(layer)
    if (act is None or layer.data_format != "channels_last" or layer.groups != 1
            or layer.padding not in ("valid", "same") or layer.rank != 2):
        return None
    k, s, d = _tuple2(layer.kernel_size), _tuple2(layer.strides), _tuple2(layer.dilation_rate)
    same = layer.padding == "same"

    def conv(layer: Any, x: torch.Tensor, **_: Any) -> torch.Tensor:
        w = layer.kernel.value.permute(3, 2, 0, 1)  # kH×kW×in×out -> out×in×kH×kW
        b = layer.bias.value if layer.use_bias else None
        xc = _nchw(x)
        if same:
            (t, bo), (le, r) = (_same_padding(xc.shape[2], k[0], s[0], d[0]),
                                _same_padding(xc.shape[3], k[1], s[1], d[1]))
            if t == bo and le == r:
                y = F.conv2d(xc, w, b, s, (t, le), d)
            else:
                y = F.conv2d(F.pad(xc, (le, r, t, bo)), w, b, s, 0, d)
        else:
            y = F.conv2d(xc, w, b, s, 0, d)
        return act(_nhwc(y))

    return conv


def _dense(layer: Any) -> Op | None:
    act = _activation(layer)
    if act is None or getattr(layer, "lora_enabled", False) or \
            getattr(layer, "quantization_mode", None):
        return None

    def dense(layer: Any, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return act(F.linear(x, layer.kernel.value.t(),
                            layer.bias.value if layer.use_bias else None))

    return dense


def _batch_norm(layer: Any) -> Op | None:
    if getattr(layer, "synchronized", False) or getattr(layer, "renorm", False) or \
            not isinstance(layer.axis, int):
        return None

    def bn(layer: Any, x: torch.Tensor, training: bool | None = None, mask: Any = None,
           **_: Any) -> torch.Tensor:
        if mask is not None or layer.axis not in (-1, x.ndim - 1) or x.ndim not in (2, 4):
            return layer(x, training=training, mask=mask)
        xc = _nchw(x) if x.ndim == 4 else x
        gamma = layer.gamma.value if layer.scale else None
        beta = layer.beta.value if layer.center else None
        mean, var = layer.moving_mean.value, layer.moving_variance.value
        if training and layer.trainable:
            y, batch_mean, invstd = torch.ops.aten.native_batch_norm(
                xc, gamma, beta, None, None, True, 0.0, layer.epsilon)
            with torch.no_grad():  # Keras's update: biased batch variance, Keras's momentum
                m = 1 - layer.momentum
                mean.lerp_(batch_mean.float(), m)
                var.lerp_((invstd.float() ** -2 - layer.epsilon).clamp_min(0), m)
        else:
            y = F.batch_norm(xc, mean, var, gamma, beta, False, 0.0, layer.epsilon)
        return _nhwc(y) if x.ndim == 4 else y

    return bn


def _pool(layer: Any, kind: str) -> Op | None:
    if layer.data_format != "channels_last" or layer.padding != "valid":
        return None
    k, s = _tuple2(layer.pool_size), _tuple2(layer.strides)
    fn = F.max_pool2d if kind == "max" else F.avg_pool2d
    return lambda layer, x, **_: _nhwc(fn(_nchw(x), k, s))


def _global_pool(layer: Any, kind: str) -> Op | None:
    if layer.data_format != "channels_last":
        return None
    keep = bool(getattr(layer, "keepdims", False))

    def pool(layer: Any, x: torch.Tensor, **_: Any) -> torch.Tensor:
        if x.ndim != 4:
            return layer(x)
        return x.mean((1, 2), keepdim=keep) if kind == "avg" else x.amax((1, 2), keepdim=keep)

    return pool


def _flatten(layer: Any) -> Op | None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    return lambda layer, x, **_: x.reshape(x.shape[0], -1)  # N×H×W×C order, as Keras's


def _dropout(layer: Any) -> Op | None:
    if getattr(layer, "noise_shape", None) is not None:
        return None
    return lambda layer, x, training=None, **_: F.dropout(x, layer.rate, bool(training))


def _activation_layer(layer: Any) -> Op | None:
    act = _activation(layer)
    return None if act is None else (lambda layer, x, **_: act(x))


def _relu(layer: Any) -> Op | None:
    if layer.max_value is not None or layer.negative_slope or layer.threshold:
        return None
    return lambda layer, x, **_: F.relu(x)


def _add(layer: Any) -> Op | None:
    def add(layer: Any, xs: list[torch.Tensor], **_: Any) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    return add


def _concatenate(layer: Any) -> Op | None:
    return lambda layer, xs, **_: torch.cat(list(xs), dim=layer.axis)


_CONVERTERS: dict[str, Callable[[Any], Op | None]] = {
    "Conv2D": _conv2d,
    "Dense": _dense,
    "BatchNormalization": _batch_norm,
    "MaxPooling2D": lambda layer: _pool(layer, "max"),
    "AveragePooling2D": lambda layer: _pool(layer, "avg"),
    "GlobalAveragePooling2D": lambda layer: _global_pool(layer, "avg"),
    "GlobalMaxPooling2D": lambda layer: _global_pool(layer, "max"),
    "Flatten": _flatten,
    "Dropout": _dropout,
    "Activation": _activation_layer,
    "ReLU": _relu,
    "Add": _add,
    "Concatenate": _concatenate,
}

# layer -> its plan (None: run as Keras runs it), made once per layer object
_PLANS: weakref.WeakKeyDictionary[Any, Op | None] = weakref.WeakKeyDictionary()


def _plan(op: Any) -> Op | None:
    try:
        return _PLANS[op]
    except KeyError:
        pass
    convert = _CONVERTERS.get(type(op).__name__)
    plan = convert(op) if convert is not None and type(op).__module__.startswith("keras.") \
        else None
    _PLANS[op] = plan
    return plan


def _functional(model: Any) -> Any:
    """The functional graph a Keras model runs (a Sequential's is built inside it), or None."""
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # another Keras layout: run as Keras does
        return None
    graph = model if isinstance(model, Functional) else getattr(model, "_functional", None)
    ok = isinstance(graph, Functional) and hasattr(graph, "_run_through_graph")
    return graph if ok else None


def has_graph(model: Any) -> bool:
    """Whether :func:`run_graph` can run ``model`` (a subclassed model with its own ``call``
    cannot)."""
    return _functional(model) is not None


def coverage(model: Any) -> tuple[int, int]:
    """(layers run as PyTorch kernels, operations in the graph)."""
    graph = _functional(model)
    ops = graph.operations if graph is not None else []
    return sum(_plan(op) is not None for op in ops), len(ops)


def run_graph(model: Any, x: torch.Tensor, training: bool) -> torch.Tensor:
    """``model(x, training=training)`` through its own graph, each known layer as its PyTorch
    kernel; the graph and the layers are the model's as it is now (a deep copy runs its own)."""
    from keras.src.models.functional import operation_fn

    def pick(op: Any) -> Op:
        plan = _plan(op)
        if plan is not None:
            return lambda *a, **k: plan(op, *a, **{**k, "training": training})
        return operation_fn(op, training=training)  # Keras's own call

    out = _functional(model)._run_through_graph([x], operation_fn=pick)
    return out[0] if isinstance(out, list | tuple) else out
