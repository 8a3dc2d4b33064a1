"""The smallest test that training works: memorize one batch (Karpathy's recipe), with patience
for slow learners, and, when it fails, ablations that find what makes it work: the user's step
function, dropout, weight decay, the learning rate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.subject import StepFn, Subject, default_step

__all__ = ["dropout_rates", "overfit_one_batch", "plain_loss"]


def plain_loss(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The user's loss with label smoothing removed (it puts a floor under the loss)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing > 0:
        return nn.CrossEntropyLoss(weight=loss_fn.weight, reduction=loss_fn.reduction)
    return loss_fn


def _fit_batch(step_fn: StepFn, model: nn.Module, opt: torch.optim.Optimizer,
               loss_fn: Callable[..., torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
               steps: int, target: float, curve: list[float], done: int = 0) -> int | None:
    """Train ``model`` on one batch from step ``done`` to ``steps``, measuring the train-mode
    loss every 5 steps into ``curve``; returns the step the loss fell below ``target``."""
    for step in range(done, steps):
        step_fn(model, opt, loss_fn, xb, yb)
        if (step + 1) % 5 and step + 1 < steps:
            continue  # measured every 5 steps: each measurement is a forward pass
        with torch.no_grad():  # train mode, as the step saw it (eval-mode BN stats lag)
            loss = float(F.cross_entropy(model(xb).float(), yb))
        curve.append(loss)
        if not math.isfinite(loss):
            return None
        if loss < target:
            return step + 1
    return None


def _still_falling(curve: list[float]) -> bool:
    """Whether a one-batch loss curve is coming down steadily: well below where it started and
    at its lowest over the last measurements (slow, not stuck)."""
    if len(curve) < 8 or not all(math.isfinite(v) for v in curve):
        return False
    third = len(curve) // 3
    return (curve[-1] < curve[0] - 0.02 * abs(curve[0])  # clearly below the start
            and curve[-1] <= min(curve[:-1]) + 1e-6  # at its lowest now
            and float(np.mean(curve[-third:])) < float(np.mean(curve[-2 * third:-third])))


def _fit_with_patience(step_fn: StepFn, model: nn.Module, opt: torch.optim.Optimizer,
                       loss_fn: Callable[..., torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                       steps: int, patience: int, target: float,
                       curve: list[float]) -> int | None:
    """:func:`_fit_batch` for ``steps``, then on to ``patience`` while the loss keeps falling."""
    hit = _fit_batch(step_fn, model, opt, loss_fn, xb, yb, steps, target, curve)
    if hit is None and _still_falling(curve):
        hit = _fit_batch(step_fn, model, opt, loss_fn, xb, yb, patience, target, curve,
                         done=steps)
    return hit


def overfit_one_batch(s: Subject, report: Report, x: torch.Tensor, y: torch.Tensor,
                       gen: torch.Generator, steps: int = 200, patience: int = 1000) -> None:
    """Karpathy's first test: memorize one batch of 32. A slow but correct model (a small lr)
    gets up to ``patience`` steps while its loss keeps falling. When the batch cannot be fitted,
    :func:`_ablate` looks for the one change that makes it fit."""
    c = s.num_classes
    target = 0.05 * math.log(c)
    idx = torch.randperm(len(x), generator=gen)[:32]
    xb, yb = x[idx], y[idx]
    model = s.fresh_model()
    opt = s.optimizer_for(model)
    loss_fn = plain_loss(s.loss_fn)
    start = [p.detach().clone() for p in model.parameters()]
    curve: list[float] = []
    reached = _fit_with_patience(s.step_fn, model, opt, loss_fn, xb, yb, steps, patience,
                                 target, curve)
    report.series["overfit_one_batch"] = {"step": [5 * (i + 1) for i in range(len(curve))],
                                          "loss": curve}
    if reached is not None:
        report.context["overfit_steps"] = reached
        if reached > steps:  # fitted, but only with the extra patience: a slow learner
            report.context["overfit_slow"] = reached
        return
    done = 5 * len(curve)
    finite = [v for v in curve if math.isfinite(v)]
    best = min(finite) if finite else float("nan")
    report.add("cannot-overfit", Severity.ERROR,
               f"after {done} steps on one batch of 32 the loss is "
               f"{curve[-1]:.3g} (best {best:.3g}); target < 0.05·ln C = {target:.3f} "
               f"within {steps} steps", value=best, threshold=target, step=done)
    moved = any(not torch.equal(p.detach(), p0) for p, p0 in zip(model.parameters(), start,
                                                                  strict=True))
    _ablate(s, report, xb, yb, loss_fn, steps, patience, target, moved)


@contextlib.contextmanager
def _dropout_off() -> Iterator[list[float]]:
    """Every dropout in the model off, as modules (nn.Dropout calls these functions) or
    written functionally (F.dropout in forward): the functions become the identity while the
    block runs. Yields the drop probabilities of the calls seen."""
    names = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
             "feature_alpha_dropout")
    saved = {n: getattr(F, n) for n in names if hasattr(F, n)}
    seen: list[float] = []

    def identity(x: torch.Tensor, p: float = 0.5, *args: object, **kwargs: object) -> torch.Tensor:
        if p > 0 and (kwargs.get("training", args[0] if args else True)):
            seen.append(float(p))
        return x

    for n in saved:
        setattr(F, n, identity)
    try:
        yield seen
    finally:
        for n, f in saved.items():
            setattr(F, n, f)


def _ablate(s: Subject, report: Report, xb: torch.Tensor, yb: torch.Tensor,
            loss_fn: Callable[..., torch.Tensor], steps: int, patience: int, target: float,
            moved: bool) -> None:
    """One batch could not be fitted: find what it takes. Each ablation changes one thing on
    a fresh copy and repeats the test; the first that makes the batch fit names the cause:
    the user's step function (replaced by a plain step), dropout, weight decay, then the
    learning rate (smaller first: a too-high lr is the commoner bug). When no parameter moved
    at all, only the step function can be at fault (nothing trained)."""
    def fits(model: nn.Module, opt: torch.optim.Optimizer,
             step_fn: StepFn = s.step_fn) -> int | None:
        return _fit_with_patience(step_fn, model, opt, loss_fn, xb, yb, steps, patience,
                                  target, [])

    if s.step_fn is not default_step:
        model = s.fresh_model()
        hit = fits(model, s.optimizer_for(model), default_step)
        if hit is not None:
            # a warning: it says where the fault is, not what it is; a rule that names the
            # fault (a schedule, a missing backward) outranks it
            report.add("step-fn", Severity.WARNING,
                       "with your training step one batch of 32 cannot be fitted; with a plain "
                       f"step (zero_grad, forward, backward, step) it is, in {hit} steps",
                       plain_steps=hit)
            return
    if not moved:
        return
    model = s.fresh_model()
    drops = {n: float(m.p) for n, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0}
    with _dropout_off() as calls, torch.no_grad():
        model(xb[:2])  # which dropout calls a training forward makes
    if calls:
        with _dropout_off():
            hit = fits(model, s.optimizer_for(model))
        if hit is not None:
            if drops:
                module, p = max(drops.items(), key=lambda kv: kv[1])
                where = f"p up to {p:g} in {module}"
            else:
                where = f"p up to {max(calls):g}, written functionally"
            report.add("dropout-high", Severity.ERROR,
                       f"with dropout ({where}) one batch of 32 cannot be fitted; with "
                       f"dropout off it is, in {hit} steps",
                       value=max([*drops.values(), *calls]), modules=drops)
            return
    if s.optimizer is not None and any(g.get("weight_decay", 0) for g in
                                       s.optimizer.param_groups):
        model = s.fresh_model()
        opt = s.optimizer_for(model)
        wd = max(float(g.get("weight_decay", 0)) for g in opt.param_groups)
        for g in opt.param_groups:
            g["weight_decay"] = 0.0
        hit = fits(model, opt)
        if hit is not None:
            report.add("weight-decay-high", Severity.ERROR,
                       f"with weight decay {wd:g} one batch of 32 cannot be fitted; with "
                       f"weight decay 0 it is, in {hit} steps", value=wd)
            return
    for scale in (0.1, 0.01, 10.0, 100.0, 1000.0):
        model = s.fresh_model()
        opt = s.optimizer_for(model, lr_scale=scale)
        hit = fits(model, opt)
        if hit is not None:
            lr = opt.param_groups[0]["lr"] / scale
            rule = "lr-too-high" if scale < 1 else "lr-too-low"
            report.add(rule, Severity.ERROR,
                       f"at the configured lr {lr:.3g} one batch of 32 cannot be fitted; at "
                       f"{scale:g}× ({lr * scale:.3g}) it is, in {hit} steps", value=lr,
                       lr_scale=scale)
            return


def dropout_rates(s: Subject, report: Report, xb: torch.Tensor) -> None:
    """The drop probabilities a training forward pass uses (modules and functional calls
    alike). 0.8 or more is almost always a keep probability passed as the drop rate; when the
    failed one-batch fit already named dropout, that finding stands."""
    if any(f.rule == "dropout-high" for f in report.findings):
        return
    model = s.fresh_model().train()
    with _dropout_off() as calls, torch.no_grad():
        model(xb)
    if calls and max(calls) >= 0.8:
        report.add("dropout-high", Severity.WARNING,
                   f"a training forward pass drops activations with p = {max(calls):g}: "
                   f"{max(calls):.0%} of them are zeroed (a keep probability passed as the "
                   "drop rate?)", value=max(calls), threshold=0.8)
