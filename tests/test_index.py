from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cifarlab.index import ContentIndex, IndexError_, expected_probes


def sha(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def digests(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32), dtype=np.uint8)


def colliding(home: int, tag: int, salt: int, capacity: int) -> bytes:
    """A digest whose home slot is ``home`` in a table of ``capacity`` and whose tag is ``tag``."""
    h = home + capacity * salt  # same residue modulo the capacity
    rest = hashlib.sha256(f"{home}/{tag}/{salt}".encode()).digest()[10:]
    return h.to_bytes(8, "little") + tag.to_bytes(2, "little") + rest


def check_invariants(idx: ContentIndex, model: dict[bytes, int]) -> None:
    assert len(idx) == len(model)
    keys = list(model)
    if keys:
        arr = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32)
        assert idx.lookup(arr).tolist() == [model[k] for k in keys]
        assert all(idx.get(k) == model[k] for k in keys)
    # every stored row is referenced by exactly one slot
    stored = idx._rows[idx._rows != 0]
    assert sorted((stored.astype(int) - 1).tolist()) == list(range(len(model)))
    # each occupied slot's tag is its digest's bytes 8..9
    for p in np.flatnonzero(idx._rows):
        r = int(idx._rows[p]) - 1
        assert int(idx._tags[p]) == int.from_bytes(idx._digests[r, 8:10].tobytes(), "little")
    # no empty slot between any key's home and its position (the linear-probing invariant)
    cap = idx.capacity
    for p in np.flatnonzero(idx._rows):
        r = int(idx._rows[p]) - 1
        q = int.from_bytes(idx._digests[r, :8].tobytes(), "little") % cap
        while q != p:
            assert idx._rows[q] != 0
            q = (q + 1) % cap
    assert idx.load_factor <= 0.7


# ------------------------------------------------------------------ property-based tests

ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "bulk"]), st.integers(0, 40),
              st.integers(0, 3), st.integers(0, 2), st.integers(-5, 5)),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_matches_a_dict_under_adversarial_collisions(program):
    """Keys share few home slots (heavy clustering), tags collide, the table wraps and grows."""
    idx = ContentIndex(capacity=8, with_values=True)
    model: dict[bytes, int] = {}
    for op, home, tag, salt, value in program:
        # homes are congruent modulo the initial capacity 8: everything lands in one or two
        # clusters there, wrapping at the end; after resizes the keys still share residues
        key = colliding(home % 8, tag, salt, 8)
        if op == "add":
            assert idx.add(key, value) == (key not in model)
            model[key] = value
        elif op == "remove":
            assert idx.remove(key) == (key in model)
            model.pop(key, None)
        else:
            batch = [colliding(h, tag, s, 8) for h in range(home % 8, 8) for s in range(2)]
            arr = np.frombuffer(b"".join(batch), np.uint8).reshape(-1, 32)
            new = idx.insert(arr, np.full(len(batch), value))
            assert new.sum() == len(set(batch) - set(model))
            model.update(dict.fromkeys(batch, value))
        check_invariants(idx, model)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), max_size=300), st.lists(st.integers(0, 10**6), max_size=300))
def test_set_semantics_against_python_set(inserted, removed):
    idx = ContentIndex()
    model: set[bytes] = set()
    keys = [sha(i) for i in inserted]
    if keys:
        idx.insert(np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32))
        model.update(keys)
    for i in removed:
        assert idx.remove(sha(i)) == (sha(i) in model)
        model.discard(sha(i))
    probe = [sha(i) for i in range(0, 10**6, 9973)] + keys
    arr = np.frombuffer(b"".join(probe), np.uint8).reshape(-1, 32)
    assert idx.contains(arr).tolist() == [k in model for k in probe]
    assert set(idx) == model


def test_wraparound_at_the_end_of_the_table():
    idx = ContentIndex(capacity=16)
    cap = idx.capacity
    keys = [colliding(cap - 1, 7, s, cap) for s in range(5)]  # all home in the last slot
    for k in keys:
        idx.add(k)
    assert idx.capacity == cap  # 5 of 16: no resize
    occupied = np.flatnonzero(idx._rows).tolist()
    assert occupied == [0, 1, 2, 3, cap - 1]  # the cluster wrapped to the front
    assert idx.remove(keys[0])
    assert np.flatnonzero(idx._rows).tolist() == [0, 1, 2, cap - 1]  # shifted back across
    assert all(k in idx for k in keys[1:]) and keys[0] not in idx


def test_deletes_in_a_cluster_leave_no_tombstones():
    idx = ContentIndex(capacity=32)
    cap = idx.capacity
    keys = [colliding(h, 0, s, cap) for h in (3, 4, 5) for s in range(3)]
    for k in keys:
        idx.add(k)
    for k in keys[::2]:
        idx.remove(k)
    left = keys[1::2]
    assert len(idx) == len(left) == np.count_nonzero(idx._rows)
    assert all(k in idx for k in left)
    stats = idx.probe_stats()
    assert stats["max_displacement"] <= len(left)


def test_resize_keeps_load_at_most_0_7():
    idx = ContentIndex(capacity=8, with_values=True)
    d = digests(5000, seed=1)
    for chunk in np.array_split(np.arange(5000), 17):
        idx.insert(d[chunk], chunk)
        assert idx.load_factor <= 0.7
    assert idx.lookup(d).tolist() == list(range(5000))
    assert idx.lookup(digests(100, seed=2)).tolist() == [-1] * 100


def test_bulk_insert_duplicates_keep_last_value_and_report_new():
    idx = ContentIndex(with_values=True)
    d = digests(3)
    batch = np.stack([d[0], d[1], d[0], d[2]])
    new = idx.insert(batch, np.array([1, 2, 3, 4]))
    assert new.tolist() == [False, True, True, True]
    assert idx.lookup(d).tolist() == [3, 2, 4]
    assert idx.insert(d[:1], np.array([9])).tolist() == [False]
    assert idx.get(d[0].tobytes()) == 9


def test_probe_statistics_match_knuth():
    d = digests(200_000, seed=3)
    idx = ContentIndex.from_digests(d)
    s = idx.probe_stats()
    hit, miss = expected_probes(s["load"])
    assert 0.69 < s["load"] <= 0.7
    assert s["mean_probes_hit"] == pytest.approx(hit, rel=0.05)
    assert s["mean_probes_miss"] == pytest.approx(miss, rel=0.10)


# ------------------------------------------------------------------------------ files


def test_file_round_trip_is_memory_mapped_and_read_only(tmp_path):
    d = digests(10_000, seed=4)
    idx = ContentIndex.from_digests(d, values=np.arange(10_000) * 3)
    idx.remove(d[5].tobytes())
    path = tmp_path / "f.cidx"
    idx.save(path)
    back = ContentIndex.open(path, verify=True)
    assert len(back) == len(idx) and back.with_values
    expect = (np.arange(10_000) * 3).tolist()
    expect[5] = -1
    assert back.lookup(d).tolist() == expect
    assert back.get(d[7].tobytes()) == 21
    with pytest.raises(ValueError, match="read-only"):
        back.add(d[5].tobytes(), 1)
    assert [p.name for p in tmp_path.iterdir()] == ["f.cidx"]


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path = tmp_path / "f.cidx"
    ContentIndex.from_digests(digests(1000)).save(path)
    good = path.read_bytes()

    path.write_bytes(good[:-10])
    with pytest.raises(IndexError_, match="truncated"):
        ContentIndex.open(path)
    path.write_bytes(good[:20])
    with pytest.raises(IndexError_, match="truncated"):
        ContentIndex.open(path)

    bad = bytearray(good)
    bad[20] ^= 0xFF  # inside the header
    path.write_bytes(bytes(bad))
    with pytest.raises(IndexError_, match="corrupt index header"):
        ContentIndex.open(path)

    bad = bytearray(good)
    bad[len(good) // 2] ^= 0x01  # inside the payload
    path.write_bytes(bytes(bad))
    ContentIndex.open(path)  # the constant-time checks pass...
    with pytest.raises(IndexError_, match="corrupt index payload"):
        ContentIndex.open(path, verify=True)  # ...the full check does not

    path.write_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(IndexError_, match="not a cifarlab index"):
        ContentIndex.open(path)


def test_bad_keys_are_rejected():
    idx = ContentIndex()
    with pytest.raises(ValueError, match="32-byte"):
        idx.add(b"short")
    with pytest.raises(ValueError, match="N×32 uint8"):
        idx.insert(np.zeros((2, 16), np.uint8))
    assert b"short" not in idx


def test_large_batches_are_probed_in_chunks(monkeypatch):
    import cifarlab.index as index_module

    monkeypatch.setattr(index_module, "_CHUNK", 64)  # force many chunks on a small table
    d = digests(3000, seed=5)
    idx = ContentIndex.from_digests(d[:2000], values=np.arange(2000))
    assert idx.lookup(d).tolist() == list(range(2000)) + [-1] * 1000
    assert idx.contains(d[1990:2010]).tolist() == [True] * 10 + [False] * 10
