"""Formats in, one in-memory dataset out, and the decode-once cache.

Every source (the official CIFAR-10 python release, an image-folder tree, or such a tree inside
a .tar/.tar.gz/.zip) becomes :class:`Dataset`: uint8 images N×H×W×C, int64 labels, class names and
source filenames. Decoding happens once: the arrays are cached as ``.npy`` files keyed by the
SHA-256 of the source and opened memory-mapped afterwards.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifarlab.config import DataConfig
from cifarlab.errors import DataError
from cifarlab.imaging import IMAGE_SUFFIXES, decode_image

if TYPE_CHECKING:
    from cifarlab.index import ContentIndex

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "Dataset",
    "PreparedData",
    "SplitData",
    "cache_dir",
    "channel_stats",
    "download_cifar10",
    "export_png",
    "load_data",
    "prepare",
    "resolve_source",
    "stratified_split",
]

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
_CACHE_VERSION = 3  # 2: SHA-256 fingerprints and their indexes; 3: index format 2


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
    data_sha256: str  # SHA-256 of the decoded arrays (images and labels of both splits)
    skipped: list[str] = field(default_factory=list)
    cache: Path | None = None  # the cache folder holding files.cidx and pixels.cidx

    def fingerprint_index(self, kind: str = "pixels", verify: bool = True) -> ContentIndex:
        """The saved index of ``pixels`` or ``files`` digests.

        Values are row numbers counting the train split first, then test; a digest held by
        several images maps to the first of them. ``verify`` checks the payload's CRC32 (about
        12 ms per million entries); forked workers that share an index verified once may skip it.
        """
        from cifarlab.index import ContentIndex

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

    @property
    def classes(self) -> list[str]:
        return self.train.classes


# ----------------------------------------------------------------------------- locating data


def cache_dir() -> Path:
    """``$CIFARLAB_CACHE``, else ``$XDG_CACHE_HOME/cifarlab``, else ``~/.cache/cifarlab``."""
    if env := os.environ.get("CIFARLAB_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifarlab"


def resolve_source(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the data comes from: ``explicit`` (``--data``), ``$CIFARLAB_DATA``, the user cache.

    When none is given and the cache has no copy, the official tarball is downloaded into the
    cache and checked against its published MD5.
    """
    for given, what in ((explicit, "--data"), (os.environ.get("CIFARLAB_DATA"), "CIFARLAB_DATA")):
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise DataError(
                    f"{what}={given}: no such file or folder. Point it at a "
                    "cifar-10-python.tar.gz, a cifar-10-batches-py folder, or an image-folder "
                    "tree (train/<class>/*, test/<class>/*) or archive of one."
                )
            return path
    cached = cache_dir() / CIFAR10_TARBALL
    if cached.exists():
        return cached
    url = os.environ.get("CIFARLAB_DOWNLOAD_URL", CIFAR10_URL)
    download_cifar10(cached, url=url)
    return cached


def download_cifar10(
    dest: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 30.0
) -> Path:
    """Download ``url`` to ``dest`` atomically, refusing it unless its MD5 is ``md5``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(
                f"Downloaded {url} but its MD5 is {digest.hexdigest()}, not the published "
                f"{md5}; the file was discarded. Try again, or download it yourself and pass "
                "--data PATH."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataError(
            f"Could not download CIFAR-10 from {url} ({exc}). Working offline? Point cifarlab "
            f"at a local copy: pass --data PATH or set CIFARLAB_DATA=PATH (a {CIFAR10_TARBALL}, "
            "a cifar-10-batches-py folder, or an image-folder tree or archive), or copy "
            f"{CIFAR10_TARBALL} to {dest}."
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------- the official release


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
    records = _sha256_rows(np.ascontiguousarray(data))
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
    from tqdm.auto import tqdm

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


def _read_source(path: Path, cfg: DataConfig) -> PreparedData:
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


# ----------------------------------------------------------------------------- the cache


def _source_key(path: Path, cfg: DataConfig) -> str:
    """SHA-256 of the source (file bytes; for a folder, its manifest) plus decode options."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    opts = (_CACHE_VERSION, cfg.image_size, cfg.skip_bad, cfg.test_fraction, cfg.seed)
    h.update(repr(opts).encode())
    return h.hexdigest()


def _sha256_rows(rows: np.ndarray) -> np.ndarray:
    """SHA-256 of each row's bytes (N×... uint8 -> N×32 uint8)."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    out = b"".join(hashlib.sha256(r.data).digest() for r in flat)
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 32)


def _arrays_sha256(train: Dataset, test: Dataset) -> str:
    h = hashlib.sha256()
    for a in (train.images, train.labels, test.images, test.labels):
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def prepare(source: str | os.PathLike[str] | None, cfg: DataConfig | None = None) -> PreparedData:
    """Decode ``source`` once into the cache and return it memory-mapped.

    A second call with the same source and decode options only opens the cached ``.npy`` files.
    """
    cfg = cfg or DataConfig()
    path = resolve_source(source if source is not None else cfg.source)
    key = _source_key(path, cfg)
    folder = cache_dir() / "prepared" / key[:32]
    if (folder / "meta.json").exists():
        try:
            return _open_cached(folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cache entry %s is unreadable (%s); decoding again", folder, exc)
    data = _read_source(path, cfg)
    data.data_sha256 = _arrays_sha256(data.train, data.test)
    for ds in (data.train, data.test):
        ds.pixel_sha256 = _sha256_rows(ds.images)
    _write_cache(folder, data)
    return _open_cached(folder)


def _write_cache(folder: Path, data: PreparedData) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for split, ds in (("train", data.train), ("test", data.test)):
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(ds.images))
            np.save(tmp / f"{split}_labels.npy", ds.labels.astype(np.int64))
            if ds.file_sha256 is None or ds.pixel_sha256 is None:  # pragma: no cover
                raise AssertionError("fingerprints are computed before caching")
            np.save(tmp / f"{split}_file_sha256.npy", ds.file_sha256)
            np.save(tmp / f"{split}_pixel_sha256.npy", ds.pixel_sha256)
        # Fingerprint indexes over both splits. Rows count train first, then test; a digest
        # maps to the first row holding it (inserted in reverse: the last value given wins).
        from cifarlab.index import ContentIndex

        rows = np.arange(len(data.train) + len(data.test))
        for kind in ("file", "pixel"):
            both = np.concatenate(
                [getattr(data.train, f"{kind}_sha256"), getattr(data.test, f"{kind}_sha256")])
            index = ContentIndex.from_digests(both[::-1], values=rows[::-1])
            index.save(tmp / f"{kind}s.cidx")
        meta = {
            "version": _CACHE_VERSION,
            "source": data.source,
            "data_sha256": data.data_sha256,
            "classes": data.train.classes,
            "train_filenames": data.train.filenames,
            "test_filenames": data.test.filenames,
            "skipped": data.skipped,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: marks the entry whole
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race, or a stale entry is in the way
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_cached(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != _CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('version')}")
    splits = {}
    for split in ("train", "test"):
        splits[split] = Dataset(
            np.load(folder / f"{split}_images.npy", mmap_mode="r"),
            np.load(folder / f"{split}_labels.npy"),
            meta["classes"],
            meta[f"{split}_filenames"],
            np.load(folder / f"{split}_file_sha256.npy", mmap_mode="r"),
            np.load(folder / f"{split}_pixel_sha256.npy", mmap_mode="r"),
        )
    return PreparedData(
        splits["train"], splits["test"], meta["source"], meta["data_sha256"], meta["skipped"],
        cache=folder,
    )


# --------------------------------------------------------------------------- splits and stats


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


def load_data(cfg: DataConfig | None = None, source: str | None = None) -> SplitData:
    """Prepare the source, carve the validation split from train, compute train-only stats."""
    cfg = cfg or DataConfig()
    prepared = prepare(source, cfg)
    train, val = prepared.train, None
    if cfg.val_size > 0:
        if cfg.val_size >= len(train):
            raise DataError(
                f"val_size={cfg.val_size} leaves nothing to train on: {prepared.source} has "
                f"{len(train)} training images. Pass a smaller --val-size (0 disables it)."
            )
        keep, held = stratified_split(train.labels, cfg.val_size, cfg.seed)
        train, val = train.subset(keep), train.subset(held)
    if cfg.train_fraction < 1.0:
        n_drop = len(train) - max(len(train.classes), round(len(train) * cfg.train_fraction))
        if n_drop > 0:
            keep, _ = stratified_split(train.labels, n_drop, cfg.seed + 1)
            train = train.subset(keep)
    mean, std = channel_stats(train.images)
    return SplitData(
        train, val, prepared.test, mean, std, prepared.source, prepared.data_sha256,
        prepared.skipped,
    )


def export_png(data: PreparedData, to: Path) -> int:
    """Write every image as ``to/<split>/<class>/<name>.png``; returns the number written."""
    from PIL import Image

    n = 0
    for split, ds in (("train", data.train), ("test", data.test)):
        for cls in ds.classes:
            (to / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            stem = Path(ds.filenames[i].split(":")[-1]).stem or f"{i:06d}"
            target = to / split / ds.classes[ds.labels[i]] / f"{stem}.png"
            if target.exists():
                target = target.with_name(f"{stem}_{i}.png")
            tmp = target.with_name(f".{target.name}.tmp")
            Image.fromarray(np.asarray(ds.images[i])).save(tmp, format="PNG")
            os.replace(tmp, target)
            n += 1
    return n
