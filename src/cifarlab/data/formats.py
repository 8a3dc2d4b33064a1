"""Formats in, one :class:`PreparedData` out: the official CIFAR-10 python release (read with a
restricted unpickler), image-folder trees, and such trees inside .tar, .tar.gz or .zip archives.

Every image gets its file fingerprint here (SHA-256 of its file's bytes; for the python release,
of its 3072-byte record); pixel fingerprints are taken once, by the cache.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cifarlab.config import DataConfig
from cifarlab.data.dataset import Dataset, PreparedData
from cifarlab.data.splits import stratified_split
from cifarlab.errors import DataError
from cifarlab.imaging import IMAGE_SUFFIXES, decode_image
from cifarlab.index import sha256_rows

__all__ = ["read_source"]

log = logging.getLogger(__name__)


class _BatchUnpickler(pickle.Unpickler):
    """Accepts only what the CIFAR python batches contain: numpy arrays and builtin types."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _batch_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _batch_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray

    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes under protocol 2 as _codecs.encode(str, "latin1"): harmless.
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


def _unpickle_batch(raw: bytes, name: str) -> dict[str, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{name}: not a valid CIFAR-10 python batch ({exc}).") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{name}: expected a pickled dict, got {type(obj).__name__}.")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _parse_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    d = _unpickle_batch(raw, name)
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"{name}: missing key {key!r} (has {sorted(d)}).")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: 'data' must be N×3072 uint8, got {data.shape} {data.dtype}.")
    if len(labels) != len(data):
        raise DataError(f"{name}: {len(data)} images but {len(labels)} labels.")
    raw_names = d.get("filenames") or [f"{i:05d}.png" for i in range(len(data))]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> N×H×W×C
    records = sha256_rows(data)
    return np.ascontiguousarray(images), labels, names, records


def _read_cifar_python(files: dict[str, Callable[[], bytes]], origin: str) -> PreparedData:
    """``files`` maps batch names (data_batch_1 … test_batch, batches.meta) to readers."""
    missing = [n for n in ("batches.meta", "test_batch") if n not in files]
    train_names = sorted(n for n in files if n.startswith("data_batch_"))
    if missing or not train_names:
        raise DataError(
            f"{origin}: incomplete CIFAR-10 python release; missing "
            f"{', '.join(missing) or 'data_batch_*'}."
        )
    meta = _unpickle_batch(files["batches.meta"](), f"{origin}:batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    if not classes:
        raise DataError(f"{origin}:batches.meta: missing 'label_names'.")

    def read(names: list[str]) -> Dataset:
        parts = [_parse_batch(files[n](), f"{origin}:{n}") for n in names]
        labels = np.concatenate([p[1] for p in parts])
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if len(bad):
            raise DataError(f"{origin}: label {bad[0]} outside 0..{len(classes) - 1}.")
        return Dataset(
            np.concatenate([p[0] for p in parts]),
            labels,
            classes,
            [f for p in parts for f in p[2]],
            file_sha256=np.concatenate([p[3] for p in parts]),
        )

    return PreparedData(read(train_names), read(["test_batch"]), origin, "")


# ----------------------------------------------------------------------- image-folder trees


@dataclass
class _Entry:
    split: str  # "train" or "test"
    cls: str
    name: str  # path as shown in messages
    read: Callable[[], bytes]


def _walk_dir(root: Path) -> Iterator[_Entry]:
    for split in ("train", "test"):
        base = root / split
        if not base.is_dir():
            continue
        for cls_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    yield _Entry(split, cls_dir.name, str(f), f.read_bytes)


def _archive_entries(names: list[str], origin: str) -> tuple[str, list[tuple[str, str, str]]]:
    """Find the ``[prefix/]train|test/<class>/<file>`` members; return (prefix, entries)."""
    found: list[tuple[str, str, str, str]] = []
    for n in names:
        parts = n.strip("/").split("/")
        if len(parts) < 3 or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if parts[-3] in ("train", "test") and not parts[-1].startswith("."):
            found.append(("/".join(parts[:-3]), parts[-3], parts[-2], n))
    prefixes = {f[0] for f in found}
    if not found:
        raise DataError(
            f"{origin}: no images under train/<class>/ or test/<class>/ in this archive."
        )
    if len(prefixes) > 1:
        raise DataError(f"{origin}: several dataset roots in one archive: {sorted(prefixes)}.")
    return prefixes.pop(), [(s, c, n) for _, s, c, n in found]


def _decode_entries(entries: list[_Entry], origin: str, cfg: DataConfig) -> PreparedData:
    train_classes = sorted({e.cls for e in entries if e.split == "train"})
    if not train_classes:
        raise DataError(f"{origin}: no training images found under train/<class>/.")
    extra = sorted({e.cls for e in entries if e.split == "test"} - set(train_classes))
    if extra:
        raise DataError(f"{origin}: test classes {extra} have no training images.")
    index = {c: i for i, c in enumerate(train_classes)}
    entries = sorted(entries, key=lambda e: (e.split, index[e.cls], e.name))
    images, skipped, keep, file_hashes = [], [], [], []
    for e in tqdm(entries, desc="decoding", unit="img", leave=False, disable=None):
        try:
            raw = e.read()
            images.append(decode_image(raw, cfg.image_size, name=e.name))
            file_hashes.append(hashlib.sha256(raw).digest())
            keep.append(e)
        except DataError as exc:
            if not cfg.skip_bad:
                raise DataError(f"{exc} Pass --skip-bad to skip such files.") from exc
            skipped.append(str(exc))
    size = cfg.image_size
    arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    labels = np.array([index[e.cls] for e in keep], dtype=np.int64)
    names = [e.name for e in keep]
    is_test = np.array([e.split == "test" for e in keep], dtype=bool)
    fh = np.frombuffer(b"".join(file_hashes), dtype=np.uint8).reshape(-1, 32)
    full = Dataset(arr, labels, train_classes, names, file_sha256=fh)
    if is_test.any():
        train = full.subset(np.flatnonzero(~is_test))
        test = full.subset(np.flatnonzero(is_test))
    else:
        n_test = max(len(train_classes), round(len(full) * cfg.test_fraction))
        tr_idx, te_idx = stratified_split(full.labels, n_test, cfg.seed)
        train, test = full.subset(tr_idx), full.subset(te_idx)
        log.info("%s has no test split; held out %d images, stratified", origin, len(test))
    return PreparedData(train, test, origin, "", skipped)


def read_source(path: Path, cfg: DataConfig) -> PreparedData:
    """Decode whatever ``path`` holds (without caching; :func:`cifarlab.data.prepare` caches)."""
    origin = str(path)
    if path.is_dir():
        for cand in (path, path / "cifar-10-batches-py"):
            if (cand / "batches.meta").exists():
                files = {p.name: p.read_bytes for p in cand.iterdir() if p.is_file()}
                return _read_cifar_python(files, str(cand))
        entries = list(_walk_dir(path))
        if not entries:
            raise DataError(
                f"{origin}: neither a CIFAR-10 python folder (batches.meta, data_batch_*) nor an "
                "image-folder tree (train/<class>/*.png|jpg|webp|bmp|gif)."
            )
        return _decode_entries(entries, origin, cfg)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            _, found = _archive_entries(zf.namelist(), origin)
            entries = [_Entry(s, c, f"{origin}:{n}", partial(zf.read, n)) for s, c, n in found]
            return _decode_entries(entries, origin, cfg)
    try:
        tf = tarfile.open(path)  # noqa: SIM115 - closed by the `with tf:` below
    except (tarfile.TarError, OSError) as exc:
        raise DataError(
            f"{origin}: not a folder, .tar, .tar.gz or .zip that cifarlab can read ({exc})."
        ) from exc
    with tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        batches = {Path(n).name: m for n, m in members.items()
                   if "cifar-10-batches-py/" in n or Path(n).name == "batches.meta"}
        if "batches.meta" in batches:
            contents = {k: _tar_bytes(tf, m, origin) for k, m in batches.items()}
            return _read_cifar_python({k: partial(bytes, b) for k, b in contents.items()}, origin)
        _, found = _archive_entries(list(members), origin)
        # Read in archive order (sequential for .tar.gz), decode after.
        blobs = {n: _tar_bytes(tf, members[n], origin) for n in members}
    entries = [_Entry(s, c, f"{origin}:{n}", partial(blobs.__getitem__, n)) for s, c, n in found]
    return _decode_entries(entries, origin, cfg)


def _tar_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo, origin: str) -> bytes:
    f = tf.extractfile(m)
    if f is None:  # pragma: no cover - regular files always extract
        raise DataError(f"{origin}:{m.name}: cannot read archive member.")
    return f.read()
