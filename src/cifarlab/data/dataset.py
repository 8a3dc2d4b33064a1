"""What every source becomes: :class:`Dataset`, and the prepared and split forms around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarlab.errors import DataError
from cifarlab.index import ContentIndex

__all__ = ["Dataset", "PreparedData", "SplitData"]


@dataclass
class Dataset:
    """Images N×H×W×C uint8 (possibly memory-mapped), labels N int64, class names, filenames.

    ``file_sha256`` and ``pixel_sha256`` (N×32 uint8) fingerprint each image: the SHA-256 of its
    source file's bytes (for the python release, of its 3072-byte record) and of its decoded
    pixels. Datasets built by hand may leave them ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    filenames: list[str]
    file_sha256: np.ndarray | None = None
    pixel_sha256: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Dataset:
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(
            np.ascontiguousarray(self.images[idx]),
            self.labels[idx],
            self.classes,
            [self.filenames[i] for i in idx],
            None if self.file_sha256 is None else self.file_sha256[idx],
            None if self.pixel_sha256 is None else self.pixel_sha256[idx],
        )

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()


@dataclass
class PreparedData:
    """What a source decodes to: its train and test splits plus provenance."""

    train: Dataset
    test: Dataset
    source: str
    data_sha256: str  # SHA-256 of the pixel fingerprints and labels of both splits
    skipped: list[str] = field(default_factory=list)
    cache: Path | None = None  # the cache folder holding files.cidx and pixels.cidx

    def fingerprint_index(self, kind: str = "pixels", verify: bool = True) -> ContentIndex:
        """The saved index of ``pixels`` or ``files`` digests.

        Values are row numbers counting the train split first, then test; a digest held by
        several images maps to the first of them. ``verify`` checks the payload's CRC32 (about
        12 ms per million entries); forked workers that share an index verified once may skip it.
        """
        if kind not in ("pixels", "files"):
            raise ValueError("kind must be 'pixels' or 'files'")
        if self.cache is None:
            raise DataError("this dataset was not prepared through the cache; no index saved.")
        return ContentIndex.open(self.cache / f"{kind}.cidx", verify=verify)


@dataclass
class SplitData:
    """Train/val/test as the trainer sees them, with train-only normalization statistics."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    mean: list[float]  # per channel, in [0, 1], from the training split only
    std: list[float]
    source: str
    data_sha256: str
    skipped: list[str] = field(default_factory=list)
    prepared: PreparedData | None = None  # what the splits were cut from (its cache, indexes)

    @property
    def classes(self) -> list[str]:
        return self.train.classes
