"""The training step: :func:`training_step` eagerly, or :class:`GraphedStep`, the same step
captured once as a CUDA graph and replayed (``cuda_graphs: true``).

An eager step of a small network launches a few hundred kernels (forward, backward, autocast's
casts, the optimizer's updates), each costing the CPU some microseconds to dispatch; at
airnet's size on a Hopper GPU the CPU's dispatching, not the GPU, sets the pace. A replayed
graph is one launch. It captures :func:`training_step`'s arithmetic, so a graphed run follows
the same schedule and takes the same steps.

What a captured step needs, and how it is met here:

- fixed inputs: each batch is copied into one input tensor that the graph reads;
- fixed arithmetic: learning rates are read from device tensors that the schedule's values are
  copied into before each replay (:meth:`cifarlab.optim.Muon.lr_from_tensors`);
- fixed parameters: a parameter frozen or thawed between steps (airnet's whitening bias,
  trained for the first part of the run) changes the step, so the step is captured again;
- a warm-up: a few eager steps on a side stream before each capture, as PyTorch's CUDA-graph
  notes ask (lazy initialisation, cuDNN's autotuning and the optimizer's buffers happen there).

A compiled model (``compile: true``) is captured the same way: the warm-up steps compile it
(again when a parameter freezes, which changes its guards), so the capture replays kernels
already generated. The warm-up runs under the autocast settings of the capture (no weight-cast
cache): torch.compile guards on them, and a guard that failed inside a capture would compile
there, which a capture does not allow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.hardware import autocast
from cifarlab.optim import Muon

__all__ = ["GraphedStep", "training_step"]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  device: torch.device, precision: str, cache: bool = True) -> torch.Tensor:
    """One step: forward under autocast, backward, optimizer step; returns the detached loss.

    The trainer's loop, :class:`GraphedStep`'s warm-up and the doctor's behavioural tests all
    take their eager steps here. ``cache=False`` turns autocast's weight-cast cache off.
    """
    model.train()
    with autocast(device, precision, cache):
        loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class GraphedStep:
    """``step(x, y) -> loss``: forward, backward and optimizer step, replayed from a graph.

    The returned loss is the graph's own output tensor: read it (or copy it) before the next
    call, which overwrites it. Parameters and optimizer state are updated in place, so
    checkpointing, weight averaging and evaluation between steps see them as in an eager run.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[..., torch.Tensor], device: torch.device, precision: str,
                 warmup: int = 3):
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, not {device}")
        if not isinstance(optimizer, Muon):
            raise ValueError("a captured step needs an optimizer built with capturable=True")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device, self.precision, self.warmup = device, precision, warmup
        self.captures = 0  # how many times the step was captured (a test and a report read it)
        self._signature: tuple[bool, ...] | None = None
        self._eager_left = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._stream = torch.cuda.Stream(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        signature = tuple(p.requires_grad for p in self.model.parameters())
        if signature != self._signature:  # the first step, or a parameter frozen or thawed
            self._signature, self._graph, self._eager_left = signature, None, self.warmup
        if self._graph is None and self._eager_left > 0:
            self._eager_left -= 1
            return self._eager(x, y)
        if self._graph is None:
            self._capture(x, y)
        assert self._graph is not None and self._x is not None and self._y is not None
        self._x.copy_(x)
        self._y.copy_(y)
        self.optimizer.load_lr()
        self._graph.replay()
        assert self._loss is not None
        return self._loss

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.load_lr()
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            loss = training_step(self.model, self.optimizer, self.loss_fn, x, y, self.device,
                                 self.precision, cache=False)
        current.wait_stream(self._stream)
        loss.record_stream(current)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        torch.cuda.synchronize(self.device)
        self._graph = self._loss = None  # the last capture's memory goes back to the pool
        self._x, self._y = x.clone(), y.clone()
        self.model.train()
        # grads as the graph's own tensors: each replay writes them afresh (no accumulation),
        # and a frozen parameter has none, so the captured optimizer skips it as eagerly
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                # autocast's weight-cast cache must stay off inside a capture
                with autocast(self.device, self.precision, cache=False):
                    loss = self.loss_fn(self.model(self._x), self._y)
                loss.backward()
                self.optimizer.step()
                self._loss = loss.detach()
        except torch.cuda.OutOfMemoryError:
            raise  # (a RuntimeError too, but not the step's fault: its own message says what)
        except RuntimeError as exc:  # (CUDA's capture errors are RuntimeErrors)
            raise ConfigError(
                f"cuda_graphs: true could not capture the training step of "
                f"{type(self.model).__name__}: {str(exc).splitlines()[0]}. A step that waits "
                "for the CPU (.item(), a shape or branch that depends on a value) cannot be "
                "replayed from a graph; set cuda_graphs: false.") from exc
        self._graph = graph
        self.captures += 1
