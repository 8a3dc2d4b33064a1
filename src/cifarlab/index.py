"""SHA-256 content index: an open-addressing hash table with linear probing over numpy arrays.

What a Python dict does badly, this does well: a ``bytes`` key plus a dict entry costs about 154
bytes, a set entry about 114; here an entry costs its 32-byte digest plus one 6-byte slot at a
load factor of at most 0.7 (and 8 bytes more with values). The table saves to one file that
opens memory-mapped and read-only in milliseconds, so forked readers share its pages instead of
copying a dict page by page through reference counts.

Layout:

* ``digests``: N×32 uint8, dense, in insertion order (a delete moves the last row into the hole);
* ``values``: optional N int64, parallel to ``digests``;
* slots, as two parallel arrays of length C: ``rows`` (uint32, 0 = empty, else row + 1) and
  ``tags`` (uint16, digest bytes 8..9). The home slot is ``(digest bytes 0..7 as uint64) % C``.
  The tag settles all but 1 in 65,536 probes of other keys without touching the digest array.

Deletion shifts later members of the cluster back (Knuth's Algorithm R), so there are no
tombstones and probe lengths never degrade. Bulk operations are vectorized: each round of the
probe loop handles every still-unresolved key at once.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cifarlab.errors import CifarlabError
from cifarlab.files import atomic_write

__all__ = ["ContentIndex", "IndexError_", "expected_probes", "sha256_rows"]

DIGEST = 32
MAX_LOAD = 0.7
GROWTH = 1.5  # capacity multiplier on resize: keeps memory per entry near 32 + 8/0.47
_MAGIC = b"CLIDX\x00\x00\x01"
_VERSION = 2  # 2: 6-byte slots (uint32 row + 1, uint16 tag) as two arrays
# magic, version, flags, n, capacity, payload crc32, header crc32 (over everything before it)
_HEADER = struct.Struct("<8sIIQQII")
_HEADER_SIZE = 64
MAX_ROWS = 2**32 - 2  # rows are stored as uint32 row + 1
_CHUNK = 1 << 17  # keys per call of the vectorized probe loop: bounds its temporaries


class IndexError_(CifarlabError):
    """An index file is corrupt, truncated or of an unknown version."""

    exit_code = 3


def sha256_rows(rows: np.ndarray) -> np.ndarray:
    """SHA-256 of each row's bytes (N×... uint8 -> N×32 uint8): the one fingerprint function,
    used for images, records and everything the index holds."""
    if len(rows) == 0:
        return np.zeros((0, DIGEST), np.uint8)
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    out = b"".join(hashlib.sha256(r.data).digest() for r in flat)
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, DIGEST)


def expected_probes(load: float) -> tuple[float, float]:
    """Knuth's expected probes for linear probing at load factor ``load``: (hit, miss)."""
    return 0.5 * (1 + 1 / (1 - load)), 0.5 * (1 + 1 / (1 - load) ** 2)


def _as_digests(keys: np.ndarray | bytes | list[bytes]) -> np.ndarray:
    if isinstance(keys, bytes):
        keys = [keys]
    if isinstance(keys, list):
        if any(len(k) != DIGEST for k in keys):
            raise ValueError("every key must be a 32-byte SHA-256 digest")
        return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, DIGEST)
    arr = np.asarray(keys)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != DIGEST:
        raise ValueError(f"keys must be an N×32 uint8 array, got {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def _home_and_tag(d: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    h = d[:, :8].copy().view("<u8").ravel()
    tag = d[:, 8:10].copy().view("<u2").ravel()
    return (h % np.uint64(capacity)).astype(np.int64), tag


class ContentIndex:
    """A set (or map to int64) of SHA-256 digests.

    Example::

        idx = ContentIndex(with_values=True)
        idx.insert(digests, values=np.arange(len(digests)))   # N×32 uint8
        rows = idx.lookup(queries)                            # -1 where absent
        idx.save("fingerprints.cidx")
        shared = ContentIndex.open("fingerprints.cidx")       # memory-mapped, read-only
    """

    def __init__(self, capacity: int = 16, with_values: bool = False):
        self._cap = max(8, int(capacity))
        self._rows = np.zeros(self._cap, dtype=np.uint32)
        self._tags = np.zeros(self._cap, dtype=np.uint16)
        self._digests = np.zeros((max(8, int(self._cap * MAX_LOAD)), DIGEST), dtype=np.uint8)
        self._values: np.ndarray | None = (
            np.zeros(len(self._digests), dtype=np.int64) if with_values else None
        )
        self._n = 0
        self._readonly = False
        self._mmap: mmap.mmap | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_digests(
        cls, keys: np.ndarray, values: np.ndarray | None = None
    ) -> ContentIndex:
        """Build a table sized for ``keys`` (load just under 0.7), then bulk-insert them."""
        keys = _as_digests(keys)
        idx = cls(capacity=int(len(keys) / MAX_LOAD) + 8, with_values=values is not None)
        idx.insert(keys, values)
        return idx

    # ------------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def load_factor(self) -> float:
        return self._n / self._cap

    @property
    def with_values(self) -> bool:
        return self._values is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays: slots, digest rows and values, spare room included."""
        values = self._values.nbytes if self._values is not None else 0
        return self._rows.nbytes + self._tags.nbytes + self._digests.nbytes + values

    def digests(self) -> np.ndarray:
        """The stored digests, N×32, in row order (a read-only view)."""
        v = self._digests[: self._n]
        v.flags.writeable = False
        return v

    def values(self) -> np.ndarray:
        if self._values is None:
            raise ValueError("this index stores no values")
        v = self._values[: self._n]
        v.flags.writeable = False
        return v

    # ------------------------------------------------------------------- lookups

    def _find(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each digest: (row or -1, slot index where found or where the probe stopped)."""
        if len(d) > _CHUNK:  # chunks keep the probe loop's temporaries in cache
            parts = [self._find_chunk(d[i : i + _CHUNK]) for i in range(0, len(d), _CHUNK)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return self._find_chunk(d)

    def _find_chunk(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(d)
        rows = np.full(n, -1, dtype=np.int64)
        stop = np.zeros(n, dtype=np.int64)
        if n == 0:
            return rows, stop
        pos, tag = _home_and_tag(d, self._cap)
        active = np.arange(n)
        cap = self._cap
        while active.size:
            p = pos[active]
            r1 = self._rows[p]
            empty = r1 == 0
            cand = ~empty & (self._tags[p] == tag[active])
            if cand.any():
                ci = np.flatnonzero(cand)
                r = r1[ci].astype(np.int64) - 1
                same = (self._digests[r] == d[active[ci]]).all(axis=1)
                hit = ci[same]
                rows[active[hit]] = r[same]
                stop[active[hit]] = pos[active[hit]]
                done = empty.copy()
                done[hit] = True
            else:
                done = empty
            stop[active[empty]] = pos[active[empty]]
            active = active[~done]
            pos[active] = (pos[active] + 1) % cap
        return rows, stop

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows (or values, for an index with values) of ``keys``; -1 where absent."""
        d = _as_digests(keys)
        rows, _ = self._find(d)
        if self._values is None:
            return rows
        out = np.full(len(rows), -1, dtype=np.int64)
        found = rows >= 0
        out[found] = self._values[rows[found]]
        return out

    def contains(self, keys: np.ndarray) -> np.ndarray:
        rows, _ = self._find(_as_digests(keys))
        return rows >= 0

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes | bytearray) or len(key) != DIGEST:
            return False
        return self._find_one(bytes(key)) >= 0

    def get(self, key: bytes, default: int | None = None) -> int | None:
        """Single-key lookup: the value (or row) of ``key``, else ``default``."""
        row = self._find_one(key)
        if row < 0:
            return default
        return int(self._values[row]) if self._values is not None else row

    def _find_one(self, key: bytes) -> int:
        """Pure-Python probe for one key: no numpy temporaries."""
        cap, rows, tags, digests = self._cap, self._rows, self._tags, self._digests
        pos = int.from_bytes(key[:8], "little") % cap
        tag = int.from_bytes(key[8:10], "little")
        while True:
            r1 = int(rows[pos])
            if r1 == 0:
                return -1
            if int(tags[pos]) == tag:
                r = r1 - 1
                if digests[r].tobytes() == key:
                    return r
            pos += 1
            if pos == cap:
                pos = 0

    # ------------------------------------------------------------------ mutation

    def _check_writable(self) -> None:
        if self._readonly:
            raise ValueError("this index was opened read-only from a file")

    def insert(self, keys: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """Add ``keys`` (N×32 uint8); existing keys get their value updated.

        Returns a boolean array: True where the key was new. Duplicate keys inside one call
        keep the last value given.
        """
        self._check_writable()
        d = _as_digests(keys)
        if (values is None) != (self._values is None):
            raise ValueError("pass values exactly when the index was created with_values")
        vals = None if values is None else np.asarray(values, dtype=np.int64).reshape(-1)
        if vals is not None and len(vals) != len(d):
            raise ValueError(f"{len(d)} keys but {len(vals)} values")
        new = np.zeros(len(d), dtype=bool)
        if len(d) == 0:
            return new
        # de-duplicate within the batch, keeping the last occurrence of each key
        rev = d[::-1]
        _, first_in_rev = np.unique(rev.view(f"V{DIGEST}").ravel(), return_index=True)
        uniq = np.sort(len(d) - 1 - first_in_rev)
        du = d[uniq]
        rows, _ = self._find(du)
        present = rows >= 0
        if vals is not None and self._values is not None and present.any():
            self._values[rows[present]] = vals[uniq[present]]
        missing = uniq[~present]
        if len(missing):
            if self._n + len(missing) > MAX_ROWS:
                raise ValueError(f"an index holds at most {MAX_ROWS} keys")
            self._reserve(self._n + len(missing))
            start = self._n
            self._digests[start : start + len(missing)] = d[missing]
            if vals is not None and self._values is not None:
                self._values[start : start + len(missing)] = vals[missing]
            self._place(np.arange(start, start + len(missing), dtype=np.int64))
            self._n += len(missing)
            new[missing] = True
        return new

    def add(self, key: bytes, value: int | None = None) -> bool:
        """Single-key insert; True if the key was new."""
        vals = None if value is None else np.array([value])
        return bool(self.insert(_as_digests(key), vals)[0])

    def _place(self, rows: np.ndarray) -> None:
        """Put rows (known absent, distinct) into empty slots along their probe sequences."""
        d = self._digests[rows]
        pos, tag = _home_and_tag(d, self._cap)
        stored = (rows + 1).astype(np.uint32)
        active = np.arange(len(rows))
        cap = self._cap
        while active.size:
            p = pos[active]
            free = self._rows[p] == 0
            # among keys that reached the same free slot this round, the first one wins
            fi = np.flatnonzero(free)
            _, winners = np.unique(p[fi], return_index=True)
            won = fi[winners]
            self._rows[p[won]] = stored[active[won]]
            self._tags[p[won]] = tag[active[won]]
            placed = np.zeros(len(active), dtype=bool)
            placed[won] = True
            active = active[~placed]
            pos[active] = (pos[active] + 1) % cap

    def _reserve(self, n: int) -> None:
        if n > len(self._digests):
            size = max(n, int(len(self._digests) * GROWTH) + 1)
            grown = np.zeros((size, DIGEST), dtype=np.uint8)
            grown[: self._n] = self._digests[: self._n]
            self._digests = grown
            if self._values is not None:
                gv = np.zeros(size, dtype=np.int64)
                gv[: self._n] = self._values[: self._n]
                self._values = gv
        if n > self._cap * MAX_LOAD:
            cap = self._cap
            while n > cap * MAX_LOAD:
                cap = int(cap * GROWTH) + 1
            self._cap = cap
            self._rows = np.zeros(cap, dtype=np.uint32)
            self._tags = np.zeros(cap, dtype=np.uint16)
            if self._n:
                self._place(np.arange(self._n, dtype=np.int64))

    def remove(self, key: bytes) -> bool:
        """Delete one key by backward shift; True if it was present."""
        self._check_writable()
        d = _as_digests(key)
        rows, stop = self._find(d)
        row = int(rows[0])
        if row < 0:
            return False
        self._shift_back(int(stop[0]))
        last = self._n - 1
        if row != last:  # keep digests dense: move the last row into the hole
            _lrows, lstop = self._find(self._digests[last : last + 1])
            self._digests[row] = self._digests[last]
            if self._values is not None:
                self._values[row] = self._values[last]
            self._rows[lstop[0]] = row + 1  # same digest, so the tag stays
        self._n -= 1
        return True

    def remove_many(self, keys: np.ndarray) -> int:
        """Delete several keys; returns how many were present."""
        return sum(self.remove(bytes(k)) for k in _as_digests(keys))

    def _shift_back(self, i: int) -> None:
        """Empty slot ``i`` and pull later cluster members back over it (no tombstones)."""
        rows, tags, cap, digests = self._rows, self._tags, self._cap, self._digests
        j = i
        while True:
            j = (j + 1) % cap
            r1 = int(rows[j])
            if r1 == 0:
                break
            r = r1 - 1
            home = int.from_bytes(digests[r, :8].tobytes(), "little") % cap
            # the entry at j stays unless its home lies cyclically outside (i, j]
            stays = (i < home <= j) if i <= j else (home > i or home <= j)
            if not stays:
                rows[i], tags[i] = rows[j], tags[j]
                i = j
        rows[i] = 0
        tags[i] = 0

    # ------------------------------------------------------------------ statistics

    def probe_stats(self) -> dict[str, float]:
        """Displacement of stored keys from their home slots, and Knuth's expectations.

        ``mean_probes_hit`` = 1 + mean displacement is comparable to Knuth's
        ½(1 + 1/(1−α)); ``mean_probes_miss`` is measured by probing every home slot.
        """
        occupied = np.flatnonzero(self._rows)
        if len(occupied) == 0:
            return {"load": 0.0, "mean_displacement": 0.0, "max_displacement": 0,
                    "mean_probes_hit": 1.0, "mean_probes_miss": 1.0,
                    "knuth_hit": 1.0, "knuth_miss": 1.0}
        rows = self._rows[occupied].astype(np.int64) - 1
        home, _ = _home_and_tag(self._digests[rows], self._cap)
        disp = (occupied - home) % self._cap
        # an unsuccessful search from slot p probes the run of occupied slots starting at p,
        # plus the empty slot that ends it
        occ = self._rows != 0
        run = _run_lengths_from(occ)
        hit, miss = expected_probes(self.load_factor)
        return {
            "load": self.load_factor,
            "mean_displacement": float(disp.mean()),
            "max_displacement": int(disp.max()),
            "mean_probes_hit": float(1 + disp.mean()),
            "mean_probes_miss": float(1 + run.mean()),
            "knuth_hit": hit,
            "knuth_miss": miss,
        }

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table atomically: a 64-byte header, then values (if any), rows, tags and
        digests, in that order so that every array starts aligned to its item size."""
        path = Path(path)
        parts = [] if self._values is None else [self._values[: self._n].tobytes()]
        parts += [self._rows.tobytes(), self._tags.tobytes(), self._digests[: self._n].tobytes()]
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        flags = 1 if self._values is not None else 0
        head = _HEADER.pack(_MAGIC, _VERSION, flags, self._n, self._cap, crc, 0)[:-4]
        head += struct.pack("<I", zlib.crc32(head))
        head = head.ljust(_HEADER_SIZE, b"\0")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(head)
                for p in parts:
                    f.write(p)

        atomic_write(path, write)

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = False) -> ContentIndex:
        """Open a saved table memory-mapped and read-only.

        Always checked, in constant time: magic, version, the header's CRC32 and that the
        file size matches the header exactly (a truncated or padded file is refused).
        ``verify=True`` also checks the CRC32 of the whole payload, which reads every page.
        """
        path = Path(path)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the mmap outlives this function
        except OSError as exc:
            raise IndexError_(f"{path}: cannot open index file ({exc}).") from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER_SIZE:
                raise IndexError_(f"{path}: truncated index file ({size} bytes, no header).")
            head = f.read(_HEADER_SIZE)
            magic, version, flags, n, cap, crc, hcrc = _HEADER.unpack(head[: _HEADER.size])
            if magic != _MAGIC:
                raise IndexError_(f"{path}: not a cifarlab index file (bad magic).")
            if zlib.crc32(head[: _HEADER.size - 4]) != hcrc:
                raise IndexError_(f"{path}: corrupt index header (checksum mismatch).")
            if version != _VERSION:
                raise IndexError_(
                    f"{path}: index format version {version}; this cifarlab reads {_VERSION}."
                )
            with_values = bool(flags & 1)
            expected = _HEADER_SIZE + cap * 6 + n * DIGEST + (n * 8 if with_values else 0)
            if size != expected or n > cap:
                raise IndexError_(
                    f"{path}: truncated or damaged index file ({size} bytes, header says "
                    f"{expected}). Rebuild it."
                )
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        idx = cls.__new__(cls)
        off = _HEADER_SIZE
        idx._values = None
        if with_values:
            idx._values = np.frombuffer(mm, dtype=np.int64, count=n, offset=off)
            off += n * 8
        idx._rows = np.frombuffer(mm, dtype=np.uint32, count=cap, offset=off)
        off += cap * 4
        idx._tags = np.frombuffer(mm, dtype=np.uint16, count=cap, offset=off)
        off += cap * 2
        idx._digests = np.frombuffer(mm, dtype=np.uint8, count=n * DIGEST, offset=off).reshape(
            n, DIGEST)
        idx._cap, idx._n, idx._readonly, idx._mmap = cap, n, True, mm
        if verify:
            got = zlib.crc32(memoryview(mm)[_HEADER_SIZE:])
            if got != crc:
                raise IndexError_(f"{path}: corrupt index payload (checksum mismatch). Rebuild it.")
        return idx

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self._n):
            yield self._digests[i].tobytes()


def _run_lengths_from(occ: np.ndarray) -> np.ndarray:
    """For each slot p: how many consecutive occupied slots start at p (cyclically)."""
    n = len(occ)
    if occ.all():
        return np.full(n, n, dtype=np.int64)
    # rotate so that the last element is an empty slot: then no run wraps around
    shift = int(np.flatnonzero(~occ)[0]) + 1
    rev = np.roll(occ, -shift)[::-1].astype(np.int64)
    c = np.cumsum(rev)
    run_rev = c - np.maximum.accumulate(np.where(rev == 0, c, 0))  # ones ending here
    return np.roll(run_rev[::-1], shift)
