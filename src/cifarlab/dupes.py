"""Exact-duplicate and train/test leak reports from the SHA-256 fingerprints of a dataset.

Exact hashing finds exact copies only: a re-encoded, resized, mirrored or brightness-shifted copy
has a different digest. The doctor's near-duplicate check covers those.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cifarlab.data import Dataset, PreparedData
from cifarlab.index import ContentIndex

__all__ = ["EXACT_ONLY", "duplicate_groups", "find_duplicates", "train_rows_of"]

EXACT_ONLY = (
    "Exact hashing finds exact copies only: re-encoded, resized, cropped, mirrored or "
    "brightness-shifted copies have different digests and are not reported here."
)


def duplicate_groups(digests: np.ndarray) -> list[np.ndarray]:
    """Row groups (size >= 2) that share a digest, in first-occurrence order."""
    if len(digests) == 0:
        return []
    keys = np.ascontiguousarray(digests).view(f"V{digests.shape[1]}").ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    dup_ids = np.flatnonzero(counts > 1)
    if len(dup_ids) == 0:
        return []
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    groups = [order[bounds[g] : bounds[g + 1]] for g in dup_ids]
    return sorted(groups, key=lambda g: int(g[0]))


def train_rows_of(test_digests: np.ndarray, train_digests: np.ndarray,
                  index: ContentIndex | None = None) -> np.ndarray:
    """For each test digest, the first training row holding it, or -1.

    ``index`` is the prepared dataset's saved fingerprint index (rows count train first, then
    test, and a digest maps to its first row), read instead of building one; without it an
    index of the training digests is built here.
    """
    if index is not None:
        hit = index.lookup(test_digests)
        return np.where(hit < len(train_digests), hit, -1)
    built = ContentIndex.from_digests(train_digests, values=np.arange(len(train_digests)))
    return built.lookup(test_digests)


def _within(ds: Dataset, digests: np.ndarray) -> list[list[dict[str, Any]]]:
    return [[{"file": ds.filenames[i], "label": ds.classes[ds.labels[i]]} for i in g]
            for g in duplicate_groups(digests)]


def find_duplicates(data: PreparedData, by: str = "pixels") -> dict[str, Any]:
    """Exact duplicates within each split and across train/test (leaks), by ``pixels`` or
    ``files`` (SHA-256 of the decoded pixels, or of the source file's bytes)."""
    if by not in ("pixels", "files"):
        raise ValueError("by must be 'pixels' or 'files'")
    attr = "pixel_sha256" if by == "pixels" else "file_sha256"
    tr, te = getattr(data.train, attr), getattr(data.test, attr)
    index = data.fingerprint_index(by) if data.cache is not None else None
    hit = train_rows_of(te, tr, index)
    train_groups = {int(i): g for g in duplicate_groups(tr) for i in g}
    leaks = []
    for j in np.flatnonzero(hit >= 0):
        rows = train_groups.get(int(hit[j]), np.array([hit[j]]))
        leaks.append({
            "test": data.test.filenames[j],
            "test_label": data.test.classes[data.test.labels[j]],
            "train": [data.train.filenames[i] for i in rows],
            "train_labels": sorted({data.train.classes[data.train.labels[i]] for i in rows}),
        })
    within = {"train": _within(data.train, tr), "test": _within(data.test, te)}
    conflicting = sum(
        1 for groups in within.values() for g in groups if len({e["label"] for e in g}) > 1
    )
    return {
        "by": by,
        "note": EXACT_ONLY,
        "source": data.source,
        "images": {"train": len(data.train), "test": len(data.test)},
        "within": within,
        "across": leaks,
        "summary": {
            "train_duplicate_groups": len(within["train"]),
            "test_duplicate_groups": len(within["test"]),
            "test_images_in_train": len(leaks),
            "groups_with_conflicting_labels": conflicting,
        },
    }
