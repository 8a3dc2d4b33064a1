"""Preflight: data, model and behavioural checks that run before training.

Each check adds at most one finding per root cause to a :class:`Report`. The thresholds are the
issue's (3:1 imbalance, std in [0.5, 2], overfit one batch of 32 below 0.05·ln C within 200
steps); the behavioural tests train throw-away copies of the model and never touch the model
the user passed in.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.subject import Subject

__all__ = ["behaviour_checks", "data_checks", "model_checks", "preflight"]

log_c = math.log


def preflight(subject: Subject, behaviour: bool = True, seed: int = 0) -> Report:
    """Run every preflight check on ``subject``; returns the report (never raises on a finding).

    Example::

        report = preflight(Subject(model, x, y, num_classes=10, optimizer=opt, val_x=vx,
                                   val_y=vy))
        print(report.to_text())
    """
    report = Report(context={"subject": subject.context()})
    timings: dict[str, float] = {}
    for name, fn in (("data", data_checks), ("model", model_checks)):
        t = time.perf_counter()
        fn(subject, report)
        timings[name] = round(time.perf_counter() - t, 2)
    if behaviour:
        t = time.perf_counter()
        behaviour_checks(subject, report, seed=seed)
        timings["behaviour"] = round(time.perf_counter() - t, 2)
    report.context["seconds"] = timings
    return report


# ------------------------------------------------------------------------------------ data


def data_checks(s: Subject, report: Report) -> None:
    c = s.num_classes
    labels = np.asarray(s.labels_all if s.labels_all is not None else s.train_y.numpy())
    report.checks_run += ["labels-range", "class-missing", "class-imbalance"]
    bad = (labels < 0) | (labels >= c)
    if bad.any():
        report.add("labels-range", Severity.ERROR,
                   f"{int(bad.sum())} labels outside 0..{c - 1} (min {labels.min()}, max "
                   f"{labels.max()})", value=[int(labels.min()), int(labels.max())],
                   threshold=[0, c - 1], count=int(bad.sum()))
    counts = np.bincount(labels[~bad].astype(np.int64), minlength=c)[:c]
    missing = np.flatnonzero(counts == 0)
    if len(missing) and not bad.any():  # with labels out of range, counts mislead
        report.add("class-missing", Severity.ERROR,
                   f"classes {missing.tolist()} have no training images", classes=missing.tolist())
    present = counts[counts > 0]
    if len(present) > 1 and present.max() > 3 * present.min():
        ratio = present.max() / present.min()
        report.add("class-imbalance", Severity.WARNING,
                   f"largest/smallest class = {ratio:.1f}:1 (threshold 3:1)",
                   value=round(float(ratio), 2), threshold=3.0, counts=counts.tolist())

    x = s.train_x[: min(len(s.train_x), 4096)].float()
    report.checks_run += ["input-nonfinite", "input-unnormalized", "input-scaled-twice",
                          "input-std", "norm-stats-not-train", "channel-order", "blank-images"]
    finite = torch.isfinite(x)
    if not finite.all():
        n = int((~finite.flatten(1).all(1)).sum())
        report.add("input-nonfinite", Severity.CRITICAL,
                   f"{n} of {len(x)} sampled inputs contain NaN or Inf", count=n)
        x = torch.where(finite, x, torch.zeros_like(x))
    ch_mean = x.mean(dim=(0, 2, 3)) if x.ndim == 4 else x.mean(0)
    ch_std = x.std(dim=(0, 2, 3)) if x.ndim == 4 else x.std(0)
    hi = float(x.abs().max())
    if hi > 20 and float(ch_std.max()) > 10:
        report.add("input-unnormalized", Severity.ERROR,
                   f"inputs reach {hi:.0f} with per-channel std up to {float(ch_std.max()):.1f}"
                   " (normalized inputs have std ≈ 1)", value=hi, threshold=20)
    elif float(ch_std.max()) < 0.05:
        report.add("input-scaled-twice", Severity.ERROR,
                   f"per-channel std is {float(ch_std.max()):.4f} (normalized inputs have std "
                   "≈ 1; /255 applied twice gives ≈ 0.001)", value=float(ch_std.max()),
                   threshold=0.05)
    elif ((ch_std < 0.5) | (ch_std > 2)).any():
        report.add("input-std", Severity.WARNING,
                   f"per-channel std after normalization {_fmt(ch_std)} (expected within "
                   "[0.5, 2])", value=ch_std.tolist(), threshold=[0.5, 2.0])
    elif (ch_mean.abs() > 0.3).any():
        report.add("norm-stats-not-train", Severity.WARNING,
                   f"per-channel mean of the normalized training inputs is {_fmt(ch_mean)} "
                   "(|mean| > 0.3: the statistics were not computed on this split)",
                   value=ch_mean.tolist(), threshold=0.3)
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[2] >= 8 and x.shape[3] >= 8:
        # Read the same memory as N×H×W×C: if that looks far more like a photo (neighbouring
        # pixels correlate) than the layout the model gets, the data was reshaped, not permuted.
        n, c, h, w = x[:512].shape
        as_fed = min(_neighbour_corr(x[:512]))
        unscrambled = min(_neighbour_corr(x[:512].reshape(n, h, w, c).permute(0, 3, 1, 2)))
        if unscrambled > 0.6 and unscrambled - as_fed > 0.3:
            report.add("channel-order", Severity.ERROR,
                       f"neighbouring pixels correlate at {as_fed:.2f} as fed but at "
                       f"{unscrambled:.2f} when the same memory is read as H×W×C",
                       value=round(as_fed, 3), unscrambled=round(unscrambled, 3),
                       threshold=0.3)
    blank = _blank_count(s, x)
    if blank:
        n, total = blank
        report.add("blank-images", Severity.WARNING,
                   f"{n} of {total} training images are constant", count=n, total=total)
    _duplicate_checks(s, report)


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in t.tolist()) + "]"


def _neighbour_corr(x: torch.Tensor) -> tuple[float, float]:
    """Mean correlation between vertically and horizontally adjacent values, per channel."""
    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a = a.flatten() - a.mean()
        b = b.flatten() - b.mean()
        den = float(a.norm() * b.norm())
        return float((a @ b) / den) if den > 0 else 1.0

    ch = np.mean([corr(x[:, k, 1:, :], x[:, k, :-1, :]) for k in range(x.shape[1])])
    cw = np.mean([corr(x[:, k, :, 1:], x[:, k, :, :-1]) for k in range(x.shape[1])])
    return float(ch), float(cw)


def _blank_count(s: Subject, x: torch.Tensor) -> tuple[int, int] | None:
    if s.images is not None and len(s.images):
        flat = s.images.reshape(len(s.images), -1)
        n = 0
        for i in range(0, len(flat), 8192):  # chunked: bounded memory on 50,000 images
            part = flat[i : i + 8192]
            n += int((part.max(1) == part.min(1)).sum())
        total = len(flat)
    else:
        per = x.flatten(1)
        n = int((per.max(1).values - per.min(1).values < 1e-6).sum())
        total = len(x)
    return (n, total) if n else None


def _digests(images: np.ndarray) -> np.ndarray:
    return np.frombuffer(b"".join(hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest()
                                  for im in images), np.uint8).reshape(-1, 32)


def _duplicate_checks(s: Subject, report: Report) -> None:
    if s.images is None and s.pixel_sha256 is None:
        return
    from cifarlab.dupes import _groups
    from cifarlab.index import ContentIndex

    report.checks_run += ["duplicates-within", "train-test-leak"]
    tr = s.pixel_sha256 if s.pixel_sha256 is not None else _digests(s.images)  # type: ignore[arg-type]
    groups = _groups(tr)
    if groups:
        extra = sum(len(g) - 1 for g in groups)
        names = [[_name(s.filenames, int(i)) for i in g[:3]] for g in groups[:5]]
        report.add("duplicates-within", Severity.WARNING,
                   f"{len(groups)} groups of identical training images ({extra} extra copies), "
                   f"e.g. {names[0]}", count=extra, groups=names)
    te = s.test_pixel_sha256
    if te is None and s.test_images is not None:
        te = _digests(s.test_images)
    if te is not None and len(te):
        index = ContentIndex.from_digests(tr, values=np.arange(len(tr)))
        hit = index.lookup(te)
        leaks = np.flatnonzero(hit >= 0)
        if len(leaks):
            pairs = [[_name(s.test_filenames, int(j)), _name(s.filenames, int(hit[j]))]
                     for j in leaks[:10]]
            report.add("train-test-leak", Severity.ERROR,
                       f"{len(leaks)} test images are exact copies of training images "
                       f"(SHA-256 of pixels), e.g. test {pairs[0][0]} = train {pairs[0][1]}",
                       count=len(leaks), pairs=pairs)
    if s.test_images is not None and s.images is not None and len(s.test_images):
        report.checks_run.append("near-duplicates")
        near = near_duplicates(s.images, s.test_images)
        if near:
            shown = [{"test": _name(s.test_filenames, j), "train": _name(s.filenames, i),
                      "similarity": round(c, 4), "mirrored": m} for j, i, c, m in near[:20]]
            report.add("near-duplicates", Severity.INFO,
                       f"{len(near)} test images match a training image with correlation ≥ "
                       f"0.98 (mirrored or brightness-shifted copies included); suspects, not "
                       f"proof: e.g. {shown[0]}", count=len(near), pairs=shown)


def _name(names: Any, i: int) -> str:
    return str(names[i]) if names is not None and i < len(names) else f"#{i}"


def near_duplicates(train: np.ndarray, test: np.ndarray, threshold: float = 0.98,
                    shortlist: float = 0.95) -> list[tuple[int, int, float, bool]]:
    """(test index, train index, correlation, mirrored) for test images whose normalized pixels
    correlate with some training image at ``threshold`` or more, mirror images included.

    Normalizing each image to zero mean and unit norm makes the score blind to brightness and
    contrast shifts. An 8×8 thumbnail shortlists candidates by matrix products; each candidate
    is then scored at full resolution.
    """
    def thumbs(a: np.ndarray) -> torch.Tensor:
        parts = []
        for i in range(0, len(a), 4096):  # chunks: the arrays may be memory-mapped, read-only
            t = torch.from_numpy(np.array(a[i : i + 4096])).permute(0, 3, 1, 2).float()
            parts.append(F.adaptive_avg_pool2d(t, 8).flatten(1))
        t = torch.cat(parts)
        t = t - t.mean(1, keepdim=True)
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)

    def full(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a)).float().flatten(1)
        t = t - t.mean(1, keepdim=True)
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)

    tr = thumbs(train)
    tr_m = thumbs(train[:, :, ::-1])
    out = []
    for start in range(0, len(test), 1024):
        q = thumbs(test[start : start + 1024])
        for mirrored, bank in ((False, tr), (True, tr_m)):
            sim = q @ bank.T
            best, idx = sim.max(1)
            for k in torch.nonzero(best >= shortlist).flatten().tolist():
                j, i = start + k, int(idx[k])
                cand = train[i, :, ::-1] if mirrored else train[i]
                c = float((full(test[j : j + 1]) * full(cand[None])).sum())
                if c >= threshold:
                    out.append((j, i, c, mirrored))
    best_per_test: dict[int, tuple[int, int, float, bool]] = {}
    for p in out:
        if p[0] not in best_per_test or p[2] > best_per_test[p[0]][2]:
            best_per_test[p[0]] = p
    return sorted(best_per_test.values(), key=lambda p: -p[2])


# ----------------------------------------------------------------------------------- model


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
    if _is_cross_entropy(s.loss_fn) and out.ndim == 2 and out.shape[1] > 1:
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


def _is_cross_entropy(loss_fn: Any) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy


# ------------------------------------------------------------------------------- behaviour


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
        report.add("initial-loss", Severity.WARNING,
                   f"initial loss {init_loss:.3g} vs ln C = {ln_c:.3f} (expected within "
                   f"[{0.5 * ln_c:.2f}, {2 * ln_c:.2f}])", value=init_loss,
                   threshold=[0.5 * ln_c, 2 * ln_c], step=0)

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
        xg = xb.clone().requires_grad_(True)
        out = model(xg).float()
        out[0].sum().backward()
        assert xg.grad is not None
        leak = float(xg.grad[1:].abs().max())
        if leak > 1e-6:
            report.add("batch-dependence", Severity.ERROR,
                       f"d output[0] / d input[j≠0] reaches {leak:.3g} (must be 0 in eval mode)",
                       value=leak, threshold=0.0)
        with torch.no_grad():
            other = model(torch.roll(xb, 1, 0)).float()
        if float((torch.roll(o1, 1, 0) - other).abs().max()) < 1e-6 and \
                float((o1 - o1.mean(0)).abs().max()) < 1e-6:
            report.add("ignores-input", Severity.ERROR,
                       "the model gives the same output for every input", value=0.0)

    _overfit_one_batch(s, report, x_all, y_all, gen)
    _label_signal(s, report, x_all, y_all, gen, chance)
    _lr_range(s, report, x_all, y_all, gen)


def _plain_loss(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The user's loss with label smoothing removed (it puts a floor under the loss)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing > 0:
        return nn.CrossEntropyLoss(weight=loss_fn.weight, reduction=loss_fn.reduction)
    return loss_fn


def _overfit_one_batch(s: Subject, report: Report, x: torch.Tensor, y: torch.Tensor,
                       gen: torch.Generator, steps: int = 200) -> None:
    c = s.num_classes
    target = 0.05 * log_c(c)
    idx = torch.randperm(len(x), generator=gen)[:32]
    xb, yb = x[idx], y[idx]
    model = s.fresh_model()
    opt = s.optimizer_for(model)
    loss_fn = _plain_loss(s.loss_fn)
    best, reached = float("inf"), None
    curve = []
    for step in range(steps):
        s.step_fn(model, opt, loss_fn, xb, yb)
        if (step + 1) % 5 and step + 1 < steps:
            continue  # measured every 5 steps: each measurement is a forward pass
        with torch.no_grad():  # train mode, as the step saw it (eval-mode BN stats lag)
            loss = float(F.cross_entropy(model(xb).float(), yb))
        curve.append(loss)
        if not math.isfinite(loss):
            break
        best = min(best, loss)
        if loss < target:
            reached = step + 1
            break
    report.series["overfit_one_batch"] = {"step": [5 * (i + 1) for i in range(len(curve))],
                                          "loss": curve}
    if reached is None:
        done = min(steps, 5 * len(curve))
        report.add("cannot-overfit", Severity.ERROR,
                   f"after {done} steps on one batch of 32 the loss is "
                   f"{curve[-1]:.3g} (best {best:.3g}); target < 0.05·ln C = {target:.3f} "
                   f"within {steps} steps", value=best, threshold=target, step=done)
    else:
        report.context["overfit_steps"] = reached


def _short_train(s: Subject, x: torch.Tensor, y: torch.Tensor, steps: int,
                 gen: torch.Generator, batch: int = 64) -> tuple[nn.Module, float]:
    """A throw-away model trained for ``steps``; returns it with its mean training loss per
    sample over the last quarter of the steps."""
    model = s.fresh_model()
    opt = s.optimizer_for(model)
    late = []
    for k in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = s.step_fn(model, opt, s.loss_fn, x[idx], y[idx])
        if k >= steps * 3 // 4:
            late.append(_per_sample(s, loss, batch))
    return model, float(np.mean(late)) if late else float("nan")


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
    n = min(len(x), 2048)
    xs, ys = x[:n], y[:n]
    steps = 60
    sigma = math.sqrt(chance * (1 - chance) / len(vx))
    margin = 4 * sigma + 0.02
    real_model, real_fit = _short_train(s, xs, ys, steps, gen)
    shuf_model, shuf_fit = _short_train(s, xs, ys[torch.randperm(n, generator=gen)], steps, gen)
    zero_model, _ = _short_train(s, torch.zeros_like(xs), ys, steps, gen)
    real, shuffled = _accuracy(real_model, vx, vy), _accuracy(shuf_model, vx, vy)
    zeros = _accuracy(zero_model, vx, vy)
    report.context["label_signal"] = {
        "val_acc_real": real, "val_acc_shuffled": shuffled, "val_acc_zero_input": zeros,
        "train_loss_real": real_fit, "train_loss_shuffled": shuf_fit, "chance": chance,
        "margin": margin, "steps": steps}
    # A model trained on random labels lands anywhere near chance (its predictions are
    # correlated, so the spread is wider than binomial); a leak puts it far above.
    leak_limit = chance + max(margin, 0.5 * (1 - chance))
    if shuffled > leak_limit:
        report.add("label-leak", Severity.ERROR,
                   f"trained on shuffled labels, validation accuracy is {shuffled:.3f} "
                   f"(chance {chance:.3f}, limit {leak_limit:.3f})", value=shuffled,
                   threshold=leak_limit)
    # Real labels are learned much faster than random ones (Zhang et al. 2017); when they are
    # not, the labels do not belong to their images. Only meaningful when training works.
    # Two independent signs must agree: validation accuracy no better than chance, and a
    # training loss no lower than with shuffled labels.
    fits = all(f.rule != "cannot-overfit" for f in report.findings)
    if fits and math.isfinite(real_fit) and math.isfinite(shuf_fit) and \
            real <= chance + margin and real_fit > 0.85 * shuf_fit:
        report.add("no-label-signal", Severity.ERROR,
                   f"after {steps} steps the training loss with the given labels is "
                   f"{real_fit:.3f}, about that with shuffled labels ({shuf_fit:.3f}; healthy: "
                   f"well below 0.85×); validation accuracy {real:.3f}, chance {chance:.3f}",
                   value=real_fit, threshold=0.85 * shuf_fit)


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
        if smooth > 4 * min(losses) and k > 10:
            break
    report.series["lr_range"] = {"lr_scale": scales, "loss": losses}
    if len(losses) < 10:
        return
    arr = np.array(losses)
    i_min = int(arr.argmin())
    grads = np.gradient(arr, np.log(scales))
    i_steep = int(grads[: max(1, i_min)].argmin()) if i_min > 0 else 0
    s_min, s_steep = scales[i_min], scales[i_steep]
    report.context["lr_range"] = {"scale_at_min": s_min, "scale_at_steepest": s_steep,
                                  "configured_lr": base[0], "suggested_lr": base[0] * s_steep}
    report.add("lr-suggestion", Severity.INFO,
               f"suggested lr ≈ {base[0] * s_steep:.3g} (steepest descent), loss minimum at "
               f"{base[0] * s_min:.3g}; configured {base[0]:.3g}",
               suggested=base[0] * s_steep, minimum=base[0] * s_min, configured=base[0])
    if s_min < 0.5 and arr[-1] > arr[i_min] * 1.5:
        report.add("lr-too-high", Severity.WARNING,
                   f"configured lr {base[0]:.3g} is {1 / s_min:.0f}× the lr at the loss "
                   f"minimum ({base[0] * s_min:.3g}) of the range test",
                   value=base[0], threshold=base[0] * s_min)
    elif s_steep > 30:
        report.add("lr-too-low", Severity.WARNING,
                   f"configured lr {base[0]:.3g} is {s_steep:.0f}× below the range test's "
                   f"suggestion {base[0] * s_steep:.3g}", value=base[0],
                   threshold=base[0] * s_steep / 30)
