"""Preflight checks on the model and its wiring: parameters missing from the optimizer, frozen
layers, outputs that do not fit the loss (probabilities into cross-entropy; anything but
log-probabilities into NLLLoss), linear layers with nothing between."""

from __future__ import annotations

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
                          "nll-input", "stacked-linear", "momentum-high", "output-range",
                          "loss-weights"]
    _momentum_check(s, report)
    _loss_weights_check(s, report)
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
    order: list[tuple[str, nn.Module, Any, Any]] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: order.append((name, mod, inp[0] if inp else None, out)))
        for name, m in model.named_modules() if name and not list(m.children())]
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
    pair = _stacked_linear(order)
    if pair is not None:
        report.add("stacked-linear", Severity.WARNING,
                   f"{pair[0]} feeds {pair[1]} through linear operations only: no "
                   "nonlinearity between them", modules=list(pair))
    if is_cross_entropy(s.loss_fn) and kind == "scores" and \
            not getattr(model, "outputs_probabilities", False):
        _output_range_check(model, x[:8], report)


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# linear in their input at evaluation: what may sit between two layers without making them
# more than one linear map
_LINEAR_BETWEEN = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool2d, nn.Identity,
                   nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d,
                   nn.modules.batchnorm._BatchNorm)


def _stacked_linear(order: list[tuple[str, nn.Module, Any, Any]]) -> tuple[str, str] | None:
    """Two weighted layers with only linear operations between them, in the order the forward
    pass ran them, each feeding the next (a functional activation in between breaks the
    chain, as it should). A depthwise convolution followed by a pointwise one is a factorized
    convolution, linear by design, so grouped convolutions are left out."""
    def weighted(m: nn.Module) -> bool:
        return isinstance(m, _WEIGHTED) and getattr(m, "groups", 1) == 1

    for i, (a, mod, _, out) in enumerate(order):
        if not weighted(mod) or not isinstance(out, torch.Tensor):
            continue
        prev = out
        for b, nxt, inp, nout in order[i + 1:]:
            if not (isinstance(inp, torch.Tensor) and inp.shape == prev.shape
                    and torch.equal(inp, prev)):
                break
            if weighted(nxt):
                return a, b
            if not isinstance(nxt, _LINEAR_BETWEEN) or not isinstance(nout, torch.Tensor):
                break
            prev = nout
    return None


# The last operation of a forward pass, as autograd records it, for the activations that bound
# a classifier's output: what each does to the logits cross-entropy expects.
_BOUNDED_OUTPUT = {
    "ReluBackward0": ("ReLU", "clamped at 0: classes whose logit is 0 get no gradient",
                      Severity.WARNING),
    "SigmoidBackward0": ("sigmoid", "squashed into (0, 1): the softmax over them can never be "
                         "confident, so the loss has a floor", Severity.ERROR),
    "TanhBackward0": ("tanh", "squashed into (-1, 1): the softmax over them can never be "
                      "confident, so the loss has a floor", Severity.ERROR),
    "HardtanhBackward0": ("hardtanh/ReLU6", "clipped to a fixed range", Severity.ERROR),
    "ClampBackward1": ("clamp", "clipped to a fixed range", Severity.WARNING),
    "ThresholdBackward0": ("threshold", "clamped at a threshold", Severity.WARNING),
    "HardsigmoidBackward0": ("hardsigmoid", "clipped into [0, 1]: the softmax over them can "
                             "never be confident, so the loss has a floor", Severity.ERROR),
}


def _output_range_check(model: nn.Module, x: torch.Tensor, report: Report) -> None:
    """A bounded activation applied to the logits: the output's last autograd node is one of
    the bounding functions (whether written as a module or functionally)."""
    with torch.enable_grad():
        out = model(x.clone().requires_grad_(True))
    node = out.grad_fn
    while node is not None and type(node).__name__ in ("ToCopyBackward0", "CloneBackward0",
                                                        "ViewBackward0", "ReshapeAliasBackward0"):
        node = node.next_functions[0][0] if node.next_functions else None
    entry = _BOUNDED_OUTPUT.get(type(node).__name__) if node is not None else None
    if entry is None:
        return
    name, effect, severity = entry
    out = out.detach().float()
    report.add("output-range", severity,
               f"the model's last operation is {name}: the logits going into "
               f"CrossEntropyLoss are {effect} (observed range [{float(out.min()):.3g}, "
               f"{float(out.max()):.3g}])", activation=name,
               value=[float(out.min()), float(out.max())])


def _loss_weights_check(s: Subject, report: Report) -> None:
    w = getattr(s.loss_fn, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() < 2:
        return
    w = w.detach().float().cpu()
    zero = [int(i) for i in torch.nonzero(w <= 0).flatten()]
    if zero:
        report.add("loss-weights", Severity.ERROR,
                   f"the loss's class weights are 0 for {len(zero)} of {w.numel()} classes "
                   f"({', '.join(map(str, zero[:10]))}): those classes are never learned",
                   classes=zero, value=w.tolist())
    elif float(w.max() / w.min()) > 100:
        report.add("loss-weights", Severity.WARNING,
                   f"the loss's class weights range from {float(w.min()):.3g} to "
                   f"{float(w.max()):.3g} ({float(w.max() / w.min()):.0f}×)",
                   value=w.tolist(), threshold=100)


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
