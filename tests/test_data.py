from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cifarlab.config import DataConfig
from cifarlab.data import (
    cache_dir,
    channel_stats,
    download_cifar10,
    export_png,
    load_data,
    prepare,
    resolve_source,
    stratified_split,
)
from cifarlab.errors import DataError
from helpers import (
    CLASSES,
    synthetic_images,
    tar_folder,
    write_cifar_python,
    write_tree,
    zip_folder,
)

# ------------------------------------------------------------------ official python release


def test_cifar_python_folder_decodes_planes_exactly(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    tr_x, tr_y, te_x, _te_y = write_cifar_python(folder)
    d = prepare(str(tmp_path))  # the parent folder is accepted too
    assert d.train.classes == CLASSES
    np.testing.assert_array_equal(d.train.images, tr_x)
    np.testing.assert_array_equal(d.train.labels, tr_y)
    np.testing.assert_array_equal(d.test.images, te_x)
    assert d.train.filenames[0] == "tr_0.png"
    assert len(d.data_sha256) == 64


def test_cifar_python_tarball(tmp_path):
    folder = tmp_path / "src" / "cifar-10-batches-py"
    tr_x, *_ = write_cifar_python(folder)
    tgz = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    d = prepare(str(tgz))
    np.testing.assert_array_equal(d.train.images, tr_x)
    assert d.source == str(tgz)


def test_restricted_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1.*forbidden global"):
        prepare(str(folder))
    assert not (tmp_path / "pwned").exists()


def test_malformed_batch_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder)
    bad = {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test_batch.*N×3072"):
        prepare(str(folder))


# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("fmt", ["png", "bmp", "webp", "gif"])
def test_tree_lossless_formats(tmp_path, fmt):
    x, y = synthetic_images(3, seed=5)
    if fmt == "gif":  # GIF is paletted: use images that fit in 256 colours exactly
        x = (x // 64 * 64).astype(np.uint8)
    write_tree(tmp_path / "t", x, y, "train", fmt=fmt)
    if fmt == "webp":  # Pillow's WebP default is lossy
        for p in (tmp_path / "t").rglob("*.webp"):
            Image.fromarray(x[int(p.stem)]).save(p, format="WEBP", lossless=True)
    d = prepare(str(tmp_path / "t"))
    order = np.lexsort((np.arange(len(y)), y))
    assert len(d.train) + len(d.test) == len(y)
    all_x = np.concatenate([d.train.images, d.test.images])
    got = {hashlib.sha256(a.tobytes()).hexdigest() for a in all_x}
    want = {hashlib.sha256(a.tobytes()).hexdigest() for a in x[order]}
    assert got == want


def test_tree_jpeg_is_close(tmp_path):
    x, y = synthetic_images(2, seed=6)
    write_tree(tmp_path / "t", x, y, "train", fmt="jpg")
    write_tree(tmp_path / "t", x, y, "test", fmt="jpg")
    d = prepare(str(tmp_path / "t"))
    # JPEG drops the pixel noise; the per-image colour survives
    order = sorted(range(len(y)), key=lambda i: (sorted(CLASSES).index(CLASSES[y[i]]), i))
    got, want = d.test.images.mean(axis=(1, 2)), x[order].mean(axis=(1, 2))
    assert np.abs(got - want).max() < 4


def test_tree_class_names_and_counts(tree):
    d = prepare(str(tree))
    assert d.train.classes == sorted(CLASSES)
    assert d.train.class_counts() == [12, 12, 12, 12]
    assert d.test.class_counts() == [4, 4, 4, 4]
    assert d.train.filenames[0].endswith(".png")


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_tree_inside_archives_matches_folder(tree, tmp_path, kind):
    ref = prepare(str(tree))
    if kind == "zip":
        arc = zip_folder(tree, tmp_path / "data.zip", "mydata")
    else:
        arc = tar_folder(tree, tmp_path / f"data.{kind}", "mydata",
                         mode="w:gz" if kind == "tar.gz" else "w")
    d = prepare(str(arc))
    np.testing.assert_array_equal(d.train.images, ref.train.images)
    np.testing.assert_array_equal(d.test.labels, ref.test.labels)
    assert d.data_sha256 == ref.data_sha256


def test_tree_without_test_gets_stratified_seeded_split(tmp_path):
    x, y = synthetic_images(10, seed=7)
    write_tree(tmp_path / "t", x, y, "train")
    a = prepare(str(tmp_path / "t"), DataConfig(test_fraction=0.2, seed=3))
    assert a.test.class_counts() == [2, 2, 2, 2]
    assert a.train.class_counts() == [8, 8, 8, 8]
    b = load_data(DataConfig(source=str(tmp_path / "t"), test_fraction=0.2, seed=3, val_size=0))
    np.testing.assert_array_equal(a.test.images, b.test.images)


def test_image_size_resizes(tmp_path):
    x, y = synthetic_images(2, size=48, seed=8)
    write_tree(tmp_path / "t", x, y, "train")
    d = prepare(str(tmp_path / "t"), DataConfig(image_size=32))
    assert d.train.images.shape[1:] == (32, 32, 3)
    d16 = prepare(str(tmp_path / "t"), DataConfig(image_size=16))
    assert d16.train.images.shape[1:] == (16, 16, 3)


def test_corrupt_image_names_file_and_skip_bad_lists_it(tree):
    bad = tree / "train" / "circle" / "0000.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=r"0000\.png.*--skip-bad"):
        prepare(str(tree))
    d = prepare(str(tree), DataConfig(skip_bad=True))
    assert len(d.skipped) == 1 and "0000.png" in d.skipped[0]
    assert d.train.class_counts()[sorted(CLASSES).index("circle")] == 11


def test_not_a_dataset_is_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a CIFAR-10 python folder"):
        prepare(str(tmp_path / "empty"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="junk.bin"):
        prepare(str(junk))


# ------------------------------------------------------------------------------- the cache


def test_second_load_is_cached_and_memory_mapped(tree):
    first = prepare(str(tree))
    t0 = time.perf_counter()
    second = prepare(str(tree))
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(second.train.images, np.memmap)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    assert len(list((cache_dir() / "prepared").iterdir())) == 1
    # a changed source gets a new entry
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tree / "train" / "circle" / "new.png")
    third = prepare(str(tree))
    assert len(third.train) == len(first.train) + 1


# ------------------------------------------------------------------- source resolution


def test_resolution_order(tmp_path, monkeypatch, tree):
    monkeypatch.setenv("CIFARLAB_DATA", str(tree))
    assert resolve_source(None) == tree
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_source(str(other)) == other
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"CIFARLAB_DATA=.*missing: no such file"):
        resolve_source(None)
    monkeypatch.delenv("CIFARLAB_DATA")
    cached = cache_dir() / "cifar-10-python.tar.gz"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    assert resolve_source(None) == cached


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_md5_and_writes_atomically(tmp_path, http_dir):
    root, base = http_dir
    folder = tmp_path / "src" / "cifar-10-batches-py"
    tr_x, *_ = write_cifar_python(folder)
    tgz = tar_folder(folder, root / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    md5 = hashlib.md5(tgz.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "cifar-10-python.tar.gz"
    download_cifar10(dest, url=f"{base}/cifar-10-python.tar.gz", md5=md5)
    assert dest.read_bytes() == tgz.read_bytes()
    np.testing.assert_array_equal(prepare(str(dest)).train.images, tr_x)
    # a wrong checksum discards the download and keeps what was there
    with pytest.raises(DataError, match="MD5"):
        download_cifar10(dest, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32)
    assert dest.read_bytes() == tgz.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_default_source_downloads_into_cache_and_rejects_wrong_md5(http_dir, monkeypatch):
    root, base = http_dir
    (root / "cifar-10-python.tar.gz").write_bytes(b"not the official file")
    monkeypatch.setenv("CIFARLAB_DOWNLOAD_URL", f"{base}/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="published c58f30108f718f92721af3b95e74349a"):
        resolve_source(None)
    assert not (cache_dir() / "cifar-10-python.tar.gz").exists()


def test_offline_error_says_how_to_point_at_a_local_copy(monkeypatch):
    monkeypatch.setenv("CIFARLAB_DOWNLOAD_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as info:
        resolve_source(None)
    msg = str(info.value)
    assert "--data PATH" in msg and "CIFARLAB_DATA" in msg and "cifar-10-python.tar.gz" in msg


# ------------------------------------------------------------------------- splits and stats


def test_stratified_split_is_proportional_and_seeded():
    labels = np.repeat(np.arange(5), [100, 100, 50, 30, 20])
    keep, held = stratified_split(labels, 30, seed=1)
    assert len(held) == 30 and len(set(keep) | set(held)) == 300
    assert np.bincount(labels[held]).tolist() == [10, 10, 5, 3, 2]
    assert np.array_equal(held, stratified_split(labels, 30, seed=1)[1])
    assert not np.array_equal(held, stratified_split(labels, 30, seed=2)[1])


def test_validation_from_train_and_stats_from_train_only(learnable):
    d = load_data(DataConfig(source=str(learnable), val_size=40))
    assert len(d.val) == 40 and len(d.train) == 480 - 40
    assert d.val.class_counts() == [10, 10, 10, 10]
    mean, std = channel_stats(d.train.images)
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(std)
    ref = d.train.images.reshape(-1, 3) / 255.0
    assert d.mean == pytest.approx(ref.mean(0).tolist(), abs=1e-9)
    assert d.std == pytest.approx(ref.std(0).tolist(), abs=1e-6)
    assert set(d.val.filenames).isdisjoint(d.train.filenames)
    full = load_data(DataConfig(source=str(learnable), val_size=0))
    assert full.val is None and len(full.train) == 480
    frac = load_data(DataConfig(source=str(learnable), val_size=0, train_fraction=0.25))
    assert frac.train.class_counts() == [30, 30, 30, 30]


def test_export_png_roundtrip(tree, tmp_path):
    d = prepare(str(tree))
    n = export_png(d, tmp_path / "out")
    assert n == len(d.train) + len(d.test)
    again = prepare(str(tmp_path / "out"))
    np.testing.assert_array_equal(np.sort(again.train.images.reshape(len(again.train), -1), 0),
                                  np.sort(d.train.images.reshape(len(d.train), -1), 0))
    assert not list((tmp_path / "out").rglob(".*tmp"))


def test_source_hash_is_remembered_by_file_identity(tmp_path, monkeypatch):
    import os

    from cifarlab.data import cache_dir, source_sha256

    f = tmp_path / "blob.tar"
    f.write_bytes(b"x" * 1000)
    digest = source_sha256(f)
    assert digest == hashlib.sha256(b"x" * 1000).hexdigest()
    known = cache_dir() / "sources.json"
    assert digest in known.read_text()
    calls = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: calls.append(p) or real_open(p, *a, **k))
    assert source_sha256(f) == digest and str(f) not in map(str, calls)  # not read again
    monkeypatch.undo()
    f.write_bytes(b"y" * 1000)  # same size, new contents and modification time
    os.utime(f, ns=(1, 1))
    assert source_sha256(f) == hashlib.sha256(b"y" * 1000).hexdigest()
