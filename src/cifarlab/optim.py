"""The optimizer, its schedule and the weight averaging the trainer uses.

Nesterov SGD in airbench's decoupled parametrization, so that each hyperparameter can be tuned
on its own: ``lr`` is the step per 1024 examples independent of momentum, ``weight_decay`` the
decay per 1024 examples independent of ``lr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.errors import ConfigError
from cifarlab.kerasnet import KerasModule

__all__ = ["QUINTIC", "Lookahead", "Muon", "build_optimizer", "orthogonalize", "schedule_progress",
           "triangle_schedule"]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int, capturable: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Nesterov SGD in airbench's decoupled parametrization, and the triangular schedule.

    With a summed loss and Nesterov momentum m, plain SGD steps are about (1 + 1/(1-m)) times the
    gradient; dividing by that (per 1024 examples) makes ``lr`` independent of momentum, and
    setting PyTorch's weight_decay to wd/lr makes the decay independent of ``lr``.

    ``capturable``: an optimizer whose step can be captured in a CUDA graph (a :class:`Muon`,
    whose groups are plain SGD where the config says sgd, with SGD's arithmetic), reading its
    learning rates from device tensors (:meth:`Muon.lr_from_tensors`).
    """
    o = cfg.optim
    kilostep = 1024 * (1 + 1 / (1 - o.momentum))
    lr = o.lr / kilostep
    wd = o.weight_decay * o.batch_size / kilostep
    if o.optimizer == "muon":
        if isinstance(model, KerasModule):
            raise ConfigError("optim.optimizer muon orthogonalizes PyTorch filter banks "
                              "(out×in×kH×kW); a Keras model keeps kH×kW×in×out kernels: use "
                              "optim.optimizer sgd for it.")
        return _build_muon(model, cfg, lr, wd, total_steps)
    norm_biases = [
        m.bias for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    ]
    own = getattr(model, "norm_biases", None)  # a Keras model's BatchNormalization offsets
    if callable(own):
        norm_biases += own()
    ids = {id(p) for p in norm_biases}
    others = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [dict(params=others, lr=lr, weight_decay=wd / lr)]
    if norm_biases:
        lr_b = lr * o.bias_scaler
        groups.append(dict(params=norm_biases, lr=lr_b, weight_decay=wd / lr_b))
    opt: torch.optim.Optimizer
    if capturable:  # torch.optim.SGD bakes a float lr into a captured graph
        opt = Muon(groups, lr=lr, momentum=o.momentum, nesterov=o.momentum > 0, muon=False)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return opt, triangle_schedule(opt, cfg, total_steps)


def _build_muon(model: nn.Module, cfg: TrainConfig, lr: float, wd: float,
                total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Muon for the trainable convolution filter banks (normalized, no weight decay, 3
    Newton–Schulz steps, as airbench94_muon); Nesterov SGD in the decoupled form for the rest:
    matrices (the head) at ``lr``, vectors (every bias, the whitening bias included) at
    ``lr·bias_scaler``. A parameter frozen later in training (the whitening bias) gets no
    gradient and is skipped."""
    o = cfg.optim
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    ids = {id(p) for p in filters}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    matrices = [p for p in rest if p.ndim >= 2]
    vectors = [p for p in rest if p.ndim < 2]
    nesterov = o.momentum > 0
    groups: list[dict[str, Any]] = [dict(params=filters, lr=o.muon_lr, momentum=o.muon_momentum,
                                         weight_decay=0.0, ns_steps=3, normalize=True,
                                         muon=True, nesterov=True,
                                         ns_precision=o.muon_ns_precision)]
    lr_b = lr * o.bias_scaler
    for params, group_lr in ((matrices, lr), (vectors, lr_b)):
        if params:
            groups.append(dict(params=params, lr=group_lr, momentum=o.momentum,
                               weight_decay=wd / group_lr, muon=False, nesterov=nesterov))
    opt = Muon(groups, compiled=bool(filters) and cfg.compile and filters[0].is_cuda)
    return opt, triangle_schedule(opt, cfg, total_steps)


_NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def triangle_schedule(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``lr_start`` to 1 over ``warmup_frac``, then linear to ``lr_end``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg, total))


def schedule_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """The triangular schedule's multiplier of the peak rate at each step (also what
    ``--engine keras`` gives Keras's optimizer)."""
    o = cfg.optim
    peak = max(1, int(o.warmup_frac * total))

    def factor(step: int) -> float:
        if step < peak:
            return o.lr_start + (1 - o.lr_start) * step / peak
        return 1 + (o.lr_end - 1) * min(1.0, (step - peak) / max(1, total - peak))

    return factor


def schedule_progress(fraction: np.ndarray | float, warmup_frac: np.ndarray | float,
                      lr_start: np.ndarray | float, lr_end: np.ndarray | float) -> np.ndarray:
    """How far along its learning-rate schedule a run is after ``fraction`` of its steps: the
    share of the triangular schedule's area (the sum of its rates) spent so far, in (0, 1], 1 at
    the end. Elementwise over arrays. A run with a long warm-up has spent little of its rate
    after a ninth of its steps, one without warm-up much more; the learning-curve model of a
    freeze-thaw study measures budget this way, so that it compares runs equally far along."""
    b = np.clip(np.asarray(fraction, dtype=float), 0.0, 1.0)
    w = np.clip(np.asarray(warmup_frac, dtype=float), 1e-9, 1.0)
    ls, le = np.asarray(lr_start, dtype=float), np.asarray(lr_end, dtype=float)

    def area(t: np.ndarray) -> np.ndarray:  # of the piecewise-linear (0, ls), (w, 1), (1, le)
        up_t = np.minimum(t, w)
        up = up_t * (ls + ls + (1 - ls) * up_t / w) / 2
        down_t = np.maximum(t - w, 0.0)
        at = 1 + (le - 1) * np.minimum(down_t / np.maximum(1 - w, 1e-9), 1.0)
        return up + down_t * (1 + at) / 2

    total = np.maximum(area(np.ones_like(b)), 1e-12)
    return np.clip(area(b) / total, 1e-6, 1.0)


class Lookahead:
    """Weight averaging that is copied back into the net (airbench's lookahead-EMA)."""

    def __init__(self, model: nn.Module):
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for (_, avg), cur in zip(self.avg.items(), model.state_dict().values(), strict=True):
            if cur.dtype.is_floating_point:
                avg.lerp_(cur, 1 - decay)
                cur.copy_(avg)


# Quintic Newton–Schulz coefficients tuned for speed (Jordan et al., "Muon", 2024): five steps
# take every singular value of a normalized matrix into about [0.7, 1.2] without converging
# exactly, which is all an update direction needs. (1.5, -0.5, 0.0) is the classic cubic
# iteration, which converges to U·Vᵀ exactly, slowly; the tests use it as a reference.
QUINTIC = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5,
                  coefficients: tuple[float, float, float] = QUINTIC,
                  eps: float = 1e-7) -> torch.Tensor:
    """The semi-orthogonal factor of a matrix, U·Vᵀ for G = U·S·Vᵀ, by Newton–Schulz iteration;
    a stack of matrices (…×m×n) is done matrix by matrix, in one batched product per step.

    Each step maps X to a·X + (b·A + c·A²)·X with A = X·Xᵀ, an odd polynomial in the singular
    values that leaves the singular vectors alone; X starts as G / ‖G‖_F so that every singular
    value starts at or below 1. Works on the short side (Xᵀ for tall matrices): cheaper, same
    result.
    """
    if g.ndim < 2:
        raise ValueError(f"orthogonalize takes a matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + eps)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz for the groups marked ``muon=True``, Nesterov SGD
    (torch.optim.SGD's arithmetic) for the others.

    A Muon step keeps a momentum buffer of the gradient, takes the Nesterov look-ahead, flattens
    it to a matrix (out × in·kh·kw for a convolution), replaces it by its semi-orthogonal factor
    (every singular value ≈ 1: the step moves all directions of the filter bank equally instead of
    along the few that dominate the gradient), scales it by √max(1, rows/cols), and subtracts
    ``lr`` times that. Decoupled weight decay shrinks the weights by ``lr·weight_decay``.
    ``normalize`` rescales each filter bank to Frobenius norm √rows before its step (airbench94's
    Muon recipe): for filters that feed a normalization layer only the direction matters, and a
    fixed norm keeps the effective step size fixed. ``ns_precision`` is the arithmetic of the
    iteration: "fp32", or "bf16" (airbench94_muon's; cheaper where bf16 units are).
    """

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = QUINTIC, muon: bool = True,
                 normalize: bool = False, compiled: bool = False, ns_precision: str = "fp32"):
        if (lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1
                or ns_precision not in _NS_DTYPES):
            raise ValueError("Muon needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, "
                             "ns_steps >= 1 and ns_precision fp32 or bf16")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=ns_coefficients, muon=muon,
                        normalize=normalize, ns_precision=ns_precision)
        super().__init__(params, defaults)
        # torch.compile'd Newton–Schulz (as airbench94_muon does): one fused kernel per
        # elementwise step instead of one per operation, for launch-bound GPU steps
        self._orthogonalize = torch.compile(orthogonalize) if compiled else orthogonalize
        self._lr_tensors: list[torch.Tensor] | None = None

    def lr_from_tensors(self, device: torch.device) -> None:
        """Read each group's learning rate from a 0-dim tensor on ``device`` from now on, so
        that a step captured in a CUDA graph follows the schedule: :meth:`load_lr` copies the
        groups' current ``lr`` values into them before each replay."""
        self._lr_tensors = [torch.tensor(float(g["lr"]), device=device)
                            for g in self.param_groups]

    def load_lr(self) -> None:
        """Copy each group's ``lr`` (which the schedule sets) into its tensor."""
        for t, group in zip(self._lr_tensors or [], self.param_groups, strict=True):
            t.fill_(float(group["lr"]))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            m, wd = group["momentum"], group["weight_decay"]
            lr: float | torch.Tensor = (group["lr"] if self._lr_tensors is None
                                        else self._lr_tensors[i])
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_steps(params, group, lr, m, wd)
            else:
                self._sgd_steps(params, group, lr, m, wd)
        return loss

    def _momenta(self, params: list[torch.Tensor], d_p: list[torch.Tensor], m: float,
                 nesterov: bool) -> list[torch.Tensor]:
        """torch.optim.SGD's momentum on a whole group at once (foreach kernels): buf = m·buf +
        d_p (a first step starts it at d_p), and the step d_p + m·buf (Nesterov) or buf."""
        if m == 0:
            return d_p
        states = [self.state[p] for p in params]
        old = [i for i, st in enumerate(states) if "momentum_buffer" in st]
        if old:
            held = [states[i]["momentum_buffer"] for i in old]
            torch._foreach_mul_(held, m)
            torch._foreach_add_(held, [d_p[i] for i in old])
        for i, st in enumerate(states):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = d_p[i].detach().clone()
        bufs = [st["momentum_buffer"] for st in states]
        return list(torch._foreach_add(d_p, bufs, alpha=m)) if nesterov else bufs

    def _sgd_steps(self, params: list[torch.Tensor], group: dict[str, Any],
                   lr: float | torch.Tensor, m: float, wd: float) -> None:
        """torch.optim.SGD's arithmetic on the whole group at once."""
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        assert len(grads) == len(params)  # step() passes only parameters with one
        d_p = list(torch._foreach_add(grads, params, alpha=wd)) if wd else grads
        _descend(params, self._momenta(params, d_p, m, group["nesterov"]), lr)

    def _muon_steps(self, params: list[torch.Tensor], group: dict[str, Any],
                    lr: float | torch.Tensor, m: float, wd: float) -> None:
        if any(p.ndim < 2 for p in params):
            raise ValueError("Muon orthogonalizes matrices and filter banks; give 1-D "
                             "parameters (biases, norms) to a group with muon=False")
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        assert len(grads) == len(params)  # step() passes only parameters with one
        updates = self._momenta(params, grads, m, group["nesterov"])
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, update in zip(params, updates, strict=True):
            by_shape.setdefault(tuple(p.shape), []).append((p, update))
        for same in by_shape.values():  # filter banks of one shape: one batched iteration
            # (groups saved before ns_precision existed step in fp32, as they did then)
            dtype = _NS_DTYPES[group.get("ns_precision", "fp32")]
            stack = torch.stack([u.reshape(len(u), -1) for _, u in same]).to(dtype)
            ortho = self._orthogonalize(stack, group["ns_steps"], group["ns_coefficients"])
            ortho *= max(1.0, stack.shape[1] / stack.shape[2]) ** 0.5
            banks = [p for p, _ in same]
            for p in banks:
                if group["normalize"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                if wd:
                    p.mul_(1 - lr * wd)
            _descend(banks, [o.view_as(p).to(p.dtype)
                             for p, o in zip(banks, ortho.unbind(0), strict=True)], lr)


def _descend(params: list[torch.Tensor], steps: list[torch.Tensor],
             lr: float | torch.Tensor) -> None:
    """params -= lr · steps, with ``lr`` a number or a 0-dim tensor (a captured step)."""
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(steps, lr))
    else:
        torch._foreach_add_(params, steps, alpha=-lr)
