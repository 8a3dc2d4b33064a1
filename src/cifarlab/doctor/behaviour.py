"""Behavioural tests on throw-away copies of the model: initial loss, eval-mode determinism and
batch independence, the one-batch overfit (:mod:`cifarlab.doctor.fitting`), label signal
against shuffled labels and zero inputs, label noise, and an LR range test."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.fitting import dropout_rates, overfit_one_batch
from cifarlab.doctor.subject import Subject

__all__ = ["behaviour_checks"]

log_c = math.log


def behaviour_checks(s: Subject, report: Report, seed: int = 0) -> None:
    c = s.num_classes
    chance = 1 / c
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.nan_to_num(s.train_x.float()), s.train_y.clone()
    ok_labels = (y_all >= 0) & (y_all < c)
    x_all, y_all = x_all[ok_labels], y_all[ok_labels]
    if len(x_all) < 32:
        return
    report.checks_run += ["initial-loss", "cannot-overfit", "batch-dependence",
                          "nondeterministic-eval", "ignores-input", "label-leak",
                          "no-label-signal", "lr-too-high", "lr-too-low"]

    # initial loss vs ln C (train-mode forward on a fresh copy: what step 0 sees)
    model = s.fresh_model()
    with torch.no_grad():
        model.train()
        idx = torch.randperm(len(x_all), generator=gen)[:256]
        init_loss = float(F.cross_entropy(model(x_all[idx]).float(), y_all[idx]))
    ln_c = log_c(c)
    report.context["initial_loss"] = {"value": init_loss, "ln_c": ln_c}
    if not math.isfinite(init_loss) or init_loss > 2 * ln_c or init_loss < 0.5 * ln_c:
        # Far off (10x ln C or more, or not finite) is direct evidence of a broken output
        # scale or init: it ranks as a diagnosis, above the symptoms it causes and above
        # learning-rate verdicts. Just outside the band is a symptom.
        extreme = not math.isfinite(init_loss) or init_loss > 10 * ln_c
        report.add("initial-loss", Severity.ERROR if extreme else Severity.WARNING,
                   f"initial loss {init_loss:.3g} vs ln C = {ln_c:.3f} (expected within "
                   f"[{0.5 * ln_c:.2f}, {2 * ln_c:.2f}]"
                   + (f"; {init_loss / ln_c:.3g}× ln C" if extreme and math.isfinite(init_loss)
                      else "") + ")", value=init_loss, threshold=[0.5 * ln_c, 2 * ln_c],
                   step=0, **({"tier": 1} if extreme else {}))

    # eval-mode properties: determinism, batch independence, use of the input
    model = s.fresh_model().eval()
    xb = x_all[:8].clone()
    with torch.no_grad():
        o1, o2 = model(xb).float(), model(xb).float()
    if not torch.allclose(o1, o2, atol=1e-5, rtol=1e-4):
        report.add("nondeterministic-eval", Severity.ERROR,
                   f"two eval passes differ by up to {float((o1 - o2).abs().max()):.3g}",
                   value=float((o1 - o2).abs().max()), threshold=1e-5)
    else:
        _input_gradient_checks(model, xb, report)

    overfit_one_batch(s, report, x_all, y_all, gen)
    dropout_rates(s, report, x_all[:8])
    # the label tests train the model: with one batch beyond reach they could say nothing
    if not any(f.rule == "cannot-overfit" for f in report.findings):
        _label_signal(s, report, x_all, y_all, gen, chance)
    _lr_range(s, report, x_all, y_all, gen)


def _input_gradient_checks(model: nn.Module, xb: torch.Tensor, report: Report) -> None:
    """Batch independence and use of the input, from gradients with respect to the input. A
    forward pass with no gradient path back to the input (a .detach() or no_grad inside
    forward) says nothing here; the monitors find the layers it cuts off."""
    xg = xb.clone().requires_grad_(True)
    out = model(xg).float()
    if not out.requires_grad:
        report.context["input_gradient"] = "none: the output has no gradient path to the input"
        return
    (grad,) = torch.autograd.grad(out[0].sum(), xg, allow_unused=True)
    if grad is None:
        report.context["input_gradient"] = "none: the output has no gradient path to the input"
        return
    leak = float(grad[1:].abs().max())
    if leak > 1e-6:
        report.add("batch-dependence", Severity.ERROR,
                   f"d output[0] / d input[j≠0] reaches {leak:.3g} (must be 0 in eval mode)",
                   value=leak, threshold=0.0)
    # Ignoring the input means the output does not depend on it at all: the gradient of
    # the output with respect to the input is exactly zero. A merely tiny gradient
    # (saturated or vanishing activations) is a different problem, found elsewhere.
    xg = xb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).float().sum(), xg, allow_unused=True)
    if grad is not None and float(grad.abs().max()) == 0.0:
        report.add("ignores-input", Severity.ERROR,
                   "the model's output does not depend on its input (its gradient with "
                   "respect to the input is exactly 0)", value=0.0)


def _short_train(s: Subject, x: torch.Tensor, y: torch.Tensor, steps: int,
                 gen: torch.Generator, batch: int = 64,
                 lr_scale: float = 1.0) -> tuple[nn.Module, float, float]:
    """A throw-away model trained for ``steps``; returns it with its mean training loss per
    sample over the last quarter of the steps and over the first quarter."""
    model = s.fresh_model()
    opt = s.optimizer_for(model, lr_scale=lr_scale)
    early, late = [], []
    for k in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = s.step_fn(model, opt, s.loss_fn, x[idx], y[idx])
        if k < max(1, steps // 4):
            early.append(_per_sample(s, loss, batch))
        if k >= steps * 3 // 4:
            late.append(_per_sample(s, loss, batch))
    return (model, float(np.mean(late)) if late else float("nan"),
            float(np.mean(early)) if early else float("nan"))


def _per_sample(s: Subject, loss: torch.Tensor, n: int) -> float:
    value = float(loss)
    return value / n if getattr(s.loss_fn, "reduction", "mean") == "sum" else value


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i : i + 512]).float() for i in range(0, len(x), 512)])
    return float((out.argmax(1) == y).float().mean())


def _label_signal(s: Subject, report: Report, x: torch.Tensor, y: torch.Tensor,
                  gen: torch.Generator, chance: float) -> None:
    """Short trainings on real labels, shuffled labels and zero inputs, scored on validation."""
    if s.val_x is None or s.val_y is None or len(s.val_x) < 100:
        return
    vx, vy = torch.nan_to_num(s.val_x.float()), s.val_y
    # a random sample, not the first n: data stored in label order would give a few classes;
    # a second sample of training images is held out to compare their labels with validation's
    n_hold = min(1024, len(x) // 4) if len(x) >= 400 else 0
    n = min(len(x) - n_hold, 2048)
    order = torch.randperm(len(x), generator=gen)
    xs, ys = x[order[:n]], y[order[:n]]
    hold = order[n:n + n_hold]
    sigma = math.sqrt(chance * (1 - chance) / len(vx))
    margin = 4 * sigma + 0.02
    # Long enough for the model to start learning: a slow but correct model (a small lr, as
    # the PyTorch tutorial's) has not moved after 60 steps. The length doubles, up to 480
    # steps, until the real labels' training loss is clearly below where it started.
    steps = 60
    while True:
        real_model, real_fit, real_start = _short_train(s, xs, ys, steps, gen)
        if steps >= 480 or not (math.isfinite(real_fit) and math.isfinite(real_start)) or \
                real_fit < real_start - 0.1 * abs(real_start):
            break
        steps *= 2
    shuf_model, shuf_fit, _ = _short_train(s, xs, ys[torch.randperm(n, generator=gen)], steps,
                                           gen)
    zero_model, _, _ = _short_train(s, torch.zeros_like(xs), ys, steps, gen)
    real, shuffled = _accuracy(real_model, vx, vy), _accuracy(shuf_model, vx, vy)
    zeros = _accuracy(zero_model, vx, vy)
    report.context["label_signal"] = {
        "val_acc_real": real, "val_acc_shuffled": shuffled, "val_acc_zero_input": zeros,
        "train_loss_real": real_fit, "train_loss_shuffled": shuf_fit, "chance": chance,
        "margin": margin, "steps": steps}
    if n_hold:
        _label_noise(report, real_model, x[hold], y[hold], real, len(vx), chance, margin)
    # A model trained on random labels lands anywhere near chance (its predictions are
    # correlated, so the spread is wider than binomial); a leak puts it far above.
    leak_limit = chance + max(margin, 0.5 * (1 - chance))
    if shuffled > leak_limit:
        # one shuffle can land high by luck on tiny data: a leak must show on a second one too
        again, _, _ = _short_train(s, xs, ys[torch.randperm(n, generator=gen)], steps, gen)
        shuffled = min(shuffled, _accuracy(again, vx, vy))
        report.context["label_signal"]["val_acc_shuffled_again"] = shuffled
    if shuffled > leak_limit:
        report.add("label-leak", Severity.ERROR,
                   f"trained on shuffled labels, validation accuracy is {shuffled:.3f} "
                   f"(chance {chance:.3f}, limit {leak_limit:.3f})", value=shuffled,
                   threshold=leak_limit)
    # Real labels are learned much faster than random ones (Zhang et al. 2017); when they are
    # not, the labels do not belong to their images. Only meaningful when training works.
    # Two independent signs must agree: validation accuracy no better than chance, and a
    # training loss no lower than with shuffled labels.
    # A test that cannot run properly gives no verdict: not when one batch cannot be fitted or
    # the initial loss is far off (nothing trains), nor with a loss that goes negative (the
    # ratio below assumes a loss bounded below by 0).
    fits = not any(f.rule in ("cannot-overfit", "initial-loss") and f.severity >= Severity.WARNING
                   for f in report.findings)
    # A slow learner (one batch took more than the usual steps to memorize) whose training
    # loss has not started to fall by the end of the longest test has not been tested yet:
    # real and shuffled labels look alike before anything is learned. No verdict.
    learned = math.isfinite(real_fit) and math.isfinite(real_start) and \
        real_fit < real_start - 0.1 * abs(real_start)
    if report.context.get("overfit_slow") and not learned:
        report.context["label_signal"]["verdict"] = (
            f"none: a slow learner (one batch took {report.context['overfit_slow']} steps) "
            f"had not started learning after {steps} steps")
        return
    if fits and math.isfinite(real_fit) and math.isfinite(shuf_fit) and real_fit >= 0 and \
            shuf_fit >= 0 and real <= chance + margin and real_fit > 0.85 * shuf_fit:
        # Nothing learned: the labels, or a learning rate too high for batches of 64 (a loss
        # summed over the batch with an lr meant for its mean, say). Smaller lrs tell them
        # apart: real labels are learned at one of them, meaningless ones at none.
        for scale in (0.1, 0.01):
            model, _, _ = _short_train(s, xs, ys, steps, gen, lr_scale=scale)
            acc = _accuracy(model, vx, vy)
            if acc > chance + margin:
                report.add("lr-too-high", Severity.ERROR,
                           f"after {steps} steps at the configured lr the model learns "
                           f"nothing (validation accuracy {real:.3f}, chance {chance:.3f}); "
                           f"at {scale:g}× the lr it reaches {acc:.3f}: the labels are fine, "
                           "the lr is too high", value=real, lr_scale=scale,
                           val_acc_scaled=acc)
                return
        report.add("no-label-signal", Severity.ERROR,
                   f"after {steps} steps the training loss with the given labels is "
                   f"{real_fit:.3f}, about that with shuffled labels ({shuf_fit:.3f}; healthy: "
                   f"well below 0.85×); validation accuracy {real:.3f}, chance {chance:.3f}",
                   value=real_fit, threshold=0.85 * shuf_fit)


def _label_noise(report: Report, model: nn.Module, hx: torch.Tensor, hy: torch.Tensor,
                 val_acc: float, n_val: int, chance: float, margin: float) -> None:
    """Confident-learning style check: the model trained on part of the training set is scored
    on held-out training images against their own labels and on validation images. Clean
    labels from one distribution agree equally often; when training labels agree much less,
    a share of them is wrong. With a fraction r of labels replaced at random, the held-out
    agreement is (1 - r)·a + r/C for a model of accuracy a, which gives the estimate of r."""
    held = _accuracy(model, hx, hy)
    ctx = report.context["label_signal"]
    ctx["held_out_train_acc"] = held
    if val_acc <= chance + margin:
        return  # the model has not learned enough for agreement to mean anything
    se = math.sqrt(val_acc * (1 - val_acc) / n_val + max(held * (1 - held), 1e-4) / len(hy))
    rate = (val_acc - held) / (val_acc - chance)
    ctx["label_noise_estimate"] = rate
    if val_acc - held > 4 * se and rate >= 0.3:
        report.add("label-noise", Severity.ERROR if rate >= 0.5 else Severity.WARNING,
                   f"a model trained on training images agrees with held-out training labels "
                   f"{held:.3f} of the time and with validation labels {val_acc:.3f}: about "
                   f"{min(rate, 1.0):.0%} of the training labels look wrong (difference "
                   f"{(val_acc - held) / se:.1f} standard errors)", value=rate, threshold=0.3,
                   held_out_acc=held, val_acc=val_acc)


def _lr_range(s: Subject, report: Report, x: torch.Tensor, y: torch.Tensor,
              gen: torch.Generator, steps: int = 100, lo: float = 1e-3,
              hi: float = 1e3) -> None:
    """Smith's LR range test on a copy: the lr multiplier grows geometrically from ``lo`` to
    ``hi`` times the configured lr; the loss is smoothed and the run stops when it blows up."""
    model = s.fresh_model()
    opt = s.optimizer_for(model)
    base = [g["lr"] for g in opt.param_groups]
    loss_fn = s.loss_fn
    scales, losses = [], []
    smooth = None
    for k in range(steps):
        scale = lo * (hi / lo) ** (k / (steps - 1))
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * scale
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = _per_sample(s, s.step_fn(model, opt, loss_fn, x[idx], y[idx]), 64)
        if not math.isfinite(loss):
            break
        smooth = loss if smooth is None else 0.8 * smooth + 0.2 * loss
        scales.append(scale)
        losses.append(smooth)
        if k > 10 and _blown_up(smooth, min(losses), losses[0]):
            break
    report.series["lr_range"] = {"lr_scale": scales, "loss": losses}
    if len(losses) < 10:
        return
    arr = np.array(losses)
    if arr.min() < 0:
        # the loss went negative (a loss not bounded below, or fed the wrong inputs): its
        # minimum says nothing about the learning rate, so the test gives no verdict
        report.context["lr_range"] = {"verdict": "none: the loss went negative"}
        return
    i_min = int(arr.argmin())
    grads = np.gradient(arr, np.log(scales))
    i_steep = int(grads[: max(1, i_min)].argmin()) if i_min > 0 else 0
    s_min, s_steep = scales[i_min], scales[i_steep]
    # A verdict needs a curve that behaved: the loss clearly fell somewhere in the sweep. A
    # flat or noisy curve (nothing learns at any lr: a bug elsewhere) gives no verdict.
    descended = arr[i_min] < 0.8 * arr[0]
    report.context["lr_range"] = {"scale_at_min": s_min, "scale_at_steepest": s_steep,
                                  "configured_lr": base[0], "suggested_lr": base[0] * s_steep,
                                  "descended": bool(descended)}
    report.add("lr-suggestion", Severity.INFO,
               f"suggested lr ≈ {base[0] * s_steep:.3g} (steepest descent), loss minimum at "
               f"{base[0] * s_min:.3g}; configured {base[0]:.3g}",
               suggested=base[0] * s_steep, minimum=base[0] * s_min, configured=base[0])
    if not descended:
        return
    # direct evidence outranks a range test: with a far-off initial loss, a verdict is a note
    weak = any(f.rule == "initial-loss" and f.severity >= Severity.ERROR for f in report.findings)
    if s_min < 0.5 and _blown_up(arr[-1], arr[i_min], arr[0], factor=0.5):
        report.add("lr-too-high", Severity.INFO if weak else Severity.WARNING,
                   f"configured lr {base[0]:.3g} is {1 / s_min:.0f}× the lr at the loss "
                   f"minimum ({base[0] * s_min:.3g}) of the range test",
                   value=base[0], threshold=base[0] * s_min)
    elif s_steep > 30:
        # Slow, not broken: a model that fits one batch and learns its labels only trains
        # slower than it could; a note, unless training shows no progress at all.
        stalled = any(f.rule in ("cannot-overfit", "plateau", "no-label-signal")
                      and f.severity >= Severity.WARNING for f in report.findings)
        report.add("lr-too-low", Severity.WARNING if stalled and not weak else Severity.INFO,
                   f"configured lr {base[0]:.3g} is {s_steep:.0f}× below the range test's "
                   f"suggestion {base[0] * s_steep:.3g}", value=base[0],
                   threshold=base[0] * s_steep / 30)


def _blown_up(value: float, minimum: float, first: float, factor: float = 3.0) -> bool:
    """Whether a loss rose far above its minimum: by ``factor`` × the minimum for a loss
    bounded below by 0 (4× the minimum, as in Smith's test), and by ``factor`` × the distance
    fallen from the start when the minimum is not positive."""
    if minimum > 0:
        return value > (1 + factor) * minimum
    return value - minimum > factor * max(abs(first - minimum), 1e-6)
