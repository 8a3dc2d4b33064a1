"""Preflight checks on the model and its wiring: parameters missing from the optimizer, frozen
layers, outputs that do not fit the loss (probabilities into cross-entropy; anything but
log-probabilities into NLLLoss), linear layers with nothing between."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.subject import Subject

__all__ = ["is_cross_entropy", "is_nll", "model_checks", "output_kind"]


def model_checks(s: Subject, report: Report) -> None:
    model = s.fresh_model()
    report.checks_run += ["params-not-in-optimizer", "frozen-layer", "softmax-before-ce",
                          "nll-input", "stacked-linear", "momentum-high"]
    _momentum_check(s, report)
    if s.optimizer is not None:
        in_opt = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in s.model.named_parameters()
                   if p.requires_grad and id(p) not in in_opt]
        if missing:
            report.add("params-not-in-optimizer", Severity.ERROR,
                       f"{len(missing)} trainable tensors are not in the optimizer: "
                       f"{', '.join(missing[:5])}", modules=missing)
    frozen = [n for n, p in s.model.named_parameters()
              if not p.requires_grad and n not in set(s.intentionally_frozen)]
    if frozen:
        report.add("frozen-layer", Severity.WARNING,
                   f"{len(frozen)} parameter tensors have requires_grad=False: "
                   f"{', '.join(frozen[:5])}", modules=frozen)
    x = s.train_x[: min(64, len(s.train_x))].float()
    x = torch.nan_to_num(x)
    model.eval()
    order: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: order.append((name, inp[0].detach(), out.detach())))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = model(x).float()
    finally:
        for h in hooks:
            h.remove()
    kind = output_kind(out)
    if is_cross_entropy(s.loss_fn) and kind == "probabilities":
        report.add("softmax-before-ce", Severity.ERROR,
                   "model outputs are probabilities (each row sums to 1) and go into "
                   "CrossEntropyLoss", value=float(out.sum(1).mean()))
    elif is_cross_entropy(s.loss_fn) and kind == "log-probabilities" and \
            not getattr(model, "outputs_probabilities", False):
        # (a Keras model with a softmax head: cifarlab's bridge hands back its log-probabilities
        # on purpose, which is Keras's categorical cross-entropy; nothing for the user to see)
        report.add("log-softmax-before-ce", Severity.INFO,
                   "model outputs are log-probabilities (logsumexp = 0) and go into "
                   "CrossEntropyLoss: harmless, the loss and gradients are unchanged",
                   value=float(torch.logsumexp(out, 1).mean()))
    elif is_nll(s.loss_fn) and kind == "probabilities":
        report.add("nll-input", Severity.ERROR,
                   "model outputs are probabilities (each row sums to 1: softmax) and go into "
                   "NLLLoss, which expects log-probabilities", value=float(out.sum(1).mean()),
                   got="probabilities")
    elif is_nll(s.loss_fn) and kind == "scores":
        report.add("nll-input", Severity.ERROR,
                   f"model outputs are raw scores (logsumexp ≈ "
                   f"{float(torch.logsumexp(out, 1).mean()):.3g}, not 0) and go into NLLLoss, "
                   "which expects log-probabilities: the loss is unbounded below",
                   value=float(torch.logsumexp(out, 1).mean()), got="scores")
    for (a, _, a_out), (b, b_in, _) in itertools.pairwise(order):
        if a_out.shape == b_in.shape and torch.equal(a_out, b_in):
            report.add("stacked-linear", Severity.WARNING,
                       f"{a} feeds {b} directly: no nonlinearity between them", modules=[a, b])
            break


def is_cross_entropy(loss_fn: Any) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy


def is_nll(loss_fn: Any) -> bool:
    return isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss


def output_kind(out: torch.Tensor) -> str | None:
    """What a classifier's N×C output is: ``probabilities`` (rows in [0, 1] summing to 1),
    ``log-probabilities`` (logsumexp 0), ``scores`` (anything else), or None (not N×C)."""
    if out.ndim != 2 or out.shape[1] < 2 or not torch.isfinite(out).all():
        return None
    sums = out.sum(1)
    if (out >= 0).all() and (out <= 1).all() and torch.allclose(sums, torch.ones_like(sums),
                                                                   atol=1e-3):
        return "probabilities"
    if (out <= 1e-6).all() and torch.allclose(torch.logsumexp(out, 1), torch.zeros_like(sums),
                                              atol=1e-3):
        return "log-probabilities"
    return "scores"


def _momentum_check(s: Subject, report: Report) -> None:
    if s.optimizer is None:
        return
    for g in s.optimizer.param_groups:
        m = g.get("momentum")
        betas = g.get("betas")
        value = float(m) if isinstance(m, (int, float)) else \
            float(betas[0]) if isinstance(betas, (tuple, list)) and betas else None
        if value is not None and value > 0.99:
            name = "momentum" if isinstance(m, (int, float)) else "beta1"
            report.add("momentum-high", Severity.WARNING,
                       f"{name} is {value:g} (above 0.99: the step averages over "
                       f"{1 / (1 - value):.0f} past gradients)" if value < 1 else
                       f"{name} is {value:g}: the step never forgets a gradient",
                       value=value, threshold=0.99)
            return
