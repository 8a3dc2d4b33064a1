"""The decode-once cache: a source's arrays as memory-mappable ``.npy`` files, with their
fingerprint indexes, keyed by the source's identity and the decode options.

A source file's SHA-256 is remembered by its identity (path, size, modification time, inode), so
a second command on a 170 MB archive does not read it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cifarlab.config import DataConfig
from cifarlab.data.dataset import Dataset, PreparedData
from cifarlab.data.formats import read_source
from cifarlab.data.sources import cache_dir, resolve_source
from cifarlab.files import atomic_write_text
from cifarlab.index import ContentIndex, sha256_rows

__all__ = ["prepare", "source_sha256"]

log = logging.getLogger(__name__)

_CACHE_VERSION = 4  # 2: fingerprints and indexes; 3: index format 2; 4: data_sha256 from rows
_KNOWN_SOURCES = "sources.json"  # file identity -> SHA-256, for source files


def source_sha256(path: Path) -> str:
    """SHA-256 of a source: a file's bytes (remembered by the file's identity), or a folder's
    manifest of relative paths, sizes and modification times."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    st = path.stat()
    identity = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    known_file = cache_dir() / _KNOWN_SOURCES
    try:
        known = json.loads(known_file.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(identity), str):
        return str(known[identity])
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    known = known if isinstance(known, dict) else {}
    known[identity] = digest
    try:
        atomic_write_text(known_file, json.dumps(known, indent=1))
    except OSError as exc:  # a read-only cache only costs the re-hash next time
        log.warning("cannot remember the hash of %s (%s)", path, exc)
    return digest


def _cache_key(path: Path, cfg: DataConfig) -> str:
    opts = (_CACHE_VERSION, cfg.image_size, cfg.skip_bad, cfg.test_fraction, cfg.seed)
    return hashlib.sha256(f"{source_sha256(path)}{opts!r}".encode()).hexdigest()


def _data_sha256(train: Dataset, test: Dataset) -> str:
    """SHA-256 of both splits' pixel fingerprints and labels: the pixels are hashed once."""
    h = hashlib.sha256()
    for ds in (train, test):
        if ds.pixel_sha256 is None:  # pragma: no cover - prepare() fingerprints first
            raise AssertionError("pixel fingerprints are computed before the data hash")
        h.update(np.ascontiguousarray(ds.pixel_sha256).data)
        h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).data)
    return h.hexdigest()


def prepare(source: str | os.PathLike[str] | None, cfg: DataConfig | None = None) -> PreparedData:
    """Decode ``source`` once into the cache and return it memory-mapped.

    A second call with the same source and decode options only opens the cached ``.npy`` files.
    """
    cfg = cfg or DataConfig()
    path = resolve_source(source if source is not None else cfg.source)
    key = _cache_key(path, cfg)
    folder = cache_dir() / "prepared" / key[:32]
    if (folder / "meta.json").exists():
        try:
            return _open_cached(folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cache entry %s is unreadable (%s); decoding again", folder, exc)
    data = read_source(path, cfg)
    for ds in (data.train, data.test):
        ds.pixel_sha256 = sha256_rows(ds.images)
    data.data_sha256 = _data_sha256(data.train, data.test)
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
        except OSError:
            # Another process won the race: its entry is whole (meta.json is written last) and
            # holds the same data (same key), and it may be reading it now, so it stays. Only an
            # entry that does not open (stale, another version) is replaced.
            try:
                _open_cached(folder)
                return
            except (OSError, ValueError, KeyError):
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
