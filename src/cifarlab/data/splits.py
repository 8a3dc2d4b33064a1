"""Splits and statistics: the stratified validation split and train fraction carved from the
training set, and per-channel statistics taken from the training split only."""

from __future__ import annotations

import numpy as np

from cifarlab.config import DataConfig, default_val_size
from cifarlab.data.dataset import PreparedData, SplitData
from cifarlab.errors import DataError

__all__ = ["channel_stats", "split", "stratified_split"]


def stratified_split(labels: np.ndarray, n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with ``n_out`` held out, proportionally per class."""
    n = len(labels)
    if not 0 <= n_out < n:
        raise DataError(f"cannot hold out {n_out} of {n} images; use a smaller split size.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts * n_out / n).astype(int)
    # hand the remainder to the classes with the largest fractional parts
    rem = n_out - quota.sum()
    order = np.argsort(-(counts * n_out / n - quota), kind="stable")
    quota[order[:rem]] += 1
    out: list[np.ndarray] = []
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        out.append(rng.permutation(idx)[:q])
    held = np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of N×H×W×C uint8 images, in float64 chunks."""
    c = images.shape[-1]
    s, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i : i + chunk], dtype=np.float64).reshape(-1, c) / 255.0
        s += x.sum(0)
        s2 += (x * x).sum(0)
        n += len(x)
    if n == 0:
        raise DataError("cannot compute statistics of an empty split.")
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
    return mean.tolist(), std.tolist()


def split(prepared: PreparedData, cfg: DataConfig) -> SplitData:
    """Carve the validation split (and the train fraction) from the training set, stratified
    and seeded, and compute the normalization statistics of what is left to train on."""
    train, val = prepared.train, None
    n_val = default_val_size(len(train)) if cfg.val_size is None else cfg.val_size
    if n_val > 0:
        if n_val >= len(train):
            raise DataError(
                f"val_size={n_val} leaves nothing to train on: {prepared.source} has "
                f"{len(train)} training images. Pass a smaller --val-size (0 disables it)."
            )
        keep, held = stratified_split(train.labels, n_val, cfg.seed)
        train, val = train.subset(keep), train.subset(held)
    if cfg.train_fraction < 1.0:
        n_drop = len(train) - max(len(train.classes), round(len(train) * cfg.train_fraction))
        if n_drop > 0:
            keep, _ = stratified_split(train.labels, n_drop, cfg.seed + 1)
            train = train.subset(keep)
    mean, std = channel_stats(train.images)
    return SplitData(
        train, val, prepared.test, mean, std, prepared.source, prepared.data_sha256,
        prepared.skipped, prepared,
    )
