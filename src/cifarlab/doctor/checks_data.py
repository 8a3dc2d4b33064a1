"""Preflight checks on the data as the model is fed it: labels, classes, scaling and
normalization, channel order, blank images, exact duplicates, train/test leaks and near-duplicate
test images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.subject import Subject
from cifarlab.dupes import duplicate_groups, train_rows_of
from cifarlab.index import sha256_rows

__all__ = ["data_checks", "near_duplicates"]


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
    elif _normalizes_first(s.model):
        pass  # a normalization layer first: it standardizes whatever scale the inputs have
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
    _split_checks(s, report, x)
    _loader_checks(s, report, x)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.nan_to_num(x.float())
    dims = (0, 2, 3) if x.ndim == 4 else (0,)
    return x.mean(dim=dims), x.std(dim=dims)


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """How two samples' per-channel statistics differ, if far beyond sampling noise: means
    apart by more than half a standard deviation, or standard deviations apart by 2×."""
    ma, sa = _channel_stats(a)
    mb, sb = _channel_stats(b)
    if ma.shape != mb.shape:
        return None
    scale = torch.maximum(sa, sb).clamp_min(1e-6)
    gap = float(((ma - mb).abs() / scale).max())
    ratio = float(torch.maximum(sa / sb.clamp_min(1e-12), sb / sa.clamp_min(1e-12)).max())
    if gap > 0.5 or ratio > 2.0:
        return (f"per-channel mean {_fmt(ma)} vs {_fmt(mb)}, std {_fmt(sa)} vs {_fmt(sb)} "
                f"(means {gap:.2f} std apart, stds up to {ratio:.2f}× apart)")
    return None


def _split_checks(s: Subject, report: Report, x: torch.Tensor) -> None:
    """Validation data fed as the training data is (same transform, same statistics)."""
    if s.val_x is None or len(s.val_x) < 32:
        return
    report.checks_run.append("split-mismatch")
    why = _mismatch(x, s.val_x[:4096])
    if why:
        report.add("split-mismatch", Severity.WARNING,
                   f"training vs validation inputs: {why}", split="validation")


def _loader_checks(s: Subject, report: Report, x: torch.Tensor, max_batches: int = 20) -> None:
    """What the user's own loader yields: shuffled batches, preprocessed as the data the
    doctor was given (and as validation)."""
    if s.loader is None:
        return
    report.checks_run += ["data-order", "split-mismatch"]
    xs, ys = [], []
    for k, batch in enumerate(s.loader):
        if k >= max_batches:
            break
        xs.append(torch.as_tensor(batch[0]).float().cpu())
        ys.append(torch.as_tensor(batch[1]).long().cpu().flatten())
    if len(ys) < 2:
        return
    c = s.num_classes
    distinct = float(np.mean([len(torch.unique(y)) for y in ys]))
    labels = np.asarray(s.labels_all if s.labels_all is not None
                        else s.train_y.numpy()).astype(np.int64)
    counts = np.bincount(labels[(labels >= 0) & (labels < c)], minlength=c)[:c]
    p = counts / max(1, counts.sum())
    b = float(np.median([len(y) for y in ys]))
    expected = float(np.sum(1 - (1 - p) ** b))  # distinct classes in a random batch of b
    if expected >= 2 and distinct < 0.5 * expected:
        report.add("data-order", Severity.WARNING,
                   f"the loader's first {len(ys)} batches hold {distinct:.1f} distinct classes "
                   f"on average; shuffled batches of {b:.0f} would hold about {expected:.1f}",
                   value=distinct, threshold=0.5 * expected, batches=len(ys))
    fed = torch.cat(xs)
    if fed.shape[1:] == x.shape[1:]:
        ref = s.val_x[:4096] if s.val_x is not None else x
        why = _mismatch(fed, ref)
        if why:
            report.add("split-mismatch", Severity.WARNING,
                       "the loader's training batches vs "
                       f"{'validation' if s.val_x is not None else 'the data given'}: {why}",
                       split="loader")


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


def _normalizes_first(model: Any) -> bool:
    """Whether the model's first layer with parameters is a normalization layer."""
    from torch import nn

    for m in model.modules():
        if next(m.parameters(recurse=False), None) is not None:
            return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                  nn.modules.instancenorm._InstanceNorm))
    return False


def _duplicate_checks(s: Subject, report: Report) -> None:
    if s.images is None and s.pixel_sha256 is None:
        return
    report.checks_run += ["duplicates-within", "train-test-leak"]
    tr = s.pixel_sha256 if s.pixel_sha256 is not None else sha256_rows(s.images)  # type: ignore[arg-type]
    groups = duplicate_groups(tr)
    if groups:
        extra = sum(len(g) - 1 for g in groups)
        names = [[_name(s.filenames, int(i)) for i in g[:3]] for g in groups[:5]]
        report.add("duplicates-within", Severity.WARNING,
                   f"{len(groups)} groups of identical training images ({extra} extra copies), "
                   f"e.g. {names[0]}", count=extra, groups=names)
        labels = s.labels_all
        if labels is not None and len(labels) == len(tr):
            conflicts = [g for g in groups if len({int(labels[int(i)]) for i in g}) > 1]
            if conflicts:
                shown = [[f"{_name(s.filenames, int(i))} (label {int(labels[int(i)])})"
                          for i in g[:3]] for g in conflicts[:5]]
                report.add("label-conflict", Severity.ERROR,
                           f"{len(conflicts)} groups of identical training images carry "
                           f"different labels, e.g. {shown[0]}", count=len(conflicts),
                           groups=shown)
    exact: set[int] = set()  # test rows already reported as exact copies
    te = s.test_pixel_sha256
    if te is None and s.test_images is not None:
        te = sha256_rows(s.test_images)
    if te is not None and len(te):
        hit = train_rows_of(te, tr, s.fingerprints)
        leaks = np.flatnonzero(hit >= 0)
        exact = {int(j) for j in leaks}
        if len(leaks):
            pairs = [[_name(s.test_filenames, int(j)), _name(s.filenames, int(hit[j]))]
                     for j in leaks[:10]]
            report.add("train-test-leak", Severity.ERROR,
                       f"{len(leaks)} test images are exact copies of training images "
                       f"(SHA-256 of pixels), e.g. test {pairs[0][0]} = train {pairs[0][1]}",
                       count=len(leaks), pairs=pairs)
    if s.test_images is not None and s.images is not None and len(s.test_images):
        report.checks_run.append("near-duplicates")
        near = [p for p in near_duplicates(s.images, s.test_images) if p[0] not in exact]
        if near:
            # Copies (mirrored, brightness-shifted or re-encoded, correlation >= 0.999) are
            # leaks; closer-than-usual matches below that are suspects (real datasets have
            # some: ciFAIR found them in CIFAR's test set).
            copies = [p for p in near if p[2] >= 0.999]
            pairs_shown = [{"test": _name(s.test_filenames, j), "train": _name(s.filenames, i),
                      "similarity": round(c, 4), "mirrored": m}
                     for j, i, c, m in (copies or near)[:20]]
            labels, test_labels = s.labels_all, s.test_labels
            conflicting = 0
            if labels is not None and test_labels is not None:
                conflicting = sum(int(labels[i]) != int(test_labels[j]) for j, i, _, _ in copies)
            # A copy or two is the background rate of real datasets (CIFAR-10's own test set
            # has one at 0.999); a planted leak or a copied folder brings many.
            many = len(copies) >= max(3, 0.0005 * len(s.test_images))
            if copies:
                report.add("near-duplicates", Severity.WARNING if many else Severity.INFO,
                           f"{len(copies)} test images are copies of training images once "
                           f"mirrored or brightness-shifted (correlation ≥ 0.999; the exact-hash "
                           f"check cannot see them), e.g. test {pairs_shown[0]['test']} = train "
                           f"{pairs_shown[0]['train']}"
                           + (f"; {conflicting} of the pairs have different labels"
                              if conflicting else "")
                           + f"; {len(near) - len(copies)} more close matches (≥ 0.98)",
                           count=len(copies), pairs=pairs_shown, conflicting_labels=conflicting)
            else:
                report.add("near-duplicates", Severity.INFO,
                           f"{len(near)} test images match a training image with correlation "
                           f"≥ 0.98 (not copies: < 0.999); suspects, not proof: e.g. "
                           f"{pairs_shown[0]}", count=len(near), pairs=pairs_shown)


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
