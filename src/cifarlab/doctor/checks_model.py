"""Preflight checks on the model and its wiring: parameters missing from the optimizer, frozen
layers, softmax or log-softmax in front of cross-entropy, linear layers with nothing between."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.subject import Subject

__all__ = ["is_cross_entropy", "model_checks"]


def model_checks(s: Subject, report: Report) -> None:
    model = s.fresh_model()
    report.checks_run += ["params-not-in-optimizer", "frozen-layer", "softmax-before-ce",
                          "stacked-linear"]
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
    if is_cross_entropy(s.loss_fn) and out.ndim == 2 and out.shape[1] > 1:
        sums = out.sum(1)
        if (out >= 0).all() and (out <= 1).all() and torch.allclose(sums, torch.ones_like(sums),
                                                                       atol=1e-3):
            report.add("softmax-before-ce", Severity.ERROR,
                       "model outputs are probabilities (each row sums to 1) and go into "
                       "CrossEntropyLoss", value=float(sums.mean()))
        elif (out <= 1e-6).all() and torch.allclose(torch.logsumexp(out, 1),
                                                   torch.zeros_like(sums), atol=1e-3):
            report.add("softmax-before-ce", Severity.ERROR,
                       "model outputs are log-probabilities (logsumexp = 0) and go into "
                       "CrossEntropyLoss", value=float(torch.logsumexp(out, 1).mean()))
    for (a, _, a_out), (b, b_in, _) in itertools.pairwise(order):
        if a_out.shape == b_in.shape and torch.equal(a_out, b_in):
            report.add("stacked-linear", Severity.WARNING,
                       f"{a} feeds {b} directly: no nonlinearity between them", modules=[a, b])
            break


def is_cross_entropy(loss_fn: Any) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy
