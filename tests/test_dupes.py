from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
from PIL import Image

from cifarlab.cli import main
from cifarlab.data import prepare
from cifarlab.dupes import EXACT_ONLY, find_duplicates
from helpers import synthetic_images, write_cifar_python, write_tree


def make_tree_with_copies(root):
    x, y = synthetic_images(5, seed=11)
    write_tree(root, x, y, "train")
    xt, yt = synthetic_images(2, seed=12)
    write_tree(root, xt, yt, "test")
    tr = root / "train"
    # an exact copy inside train (same bytes), and the same pixels as BMP (other bytes)
    shutil.copy(tr / "circle" / "0000.png", tr / "circle" / "copy.png")
    Image.open(tr / "circle" / "0001.png").save(tr / "circle" / "same_pixels.bmp")
    # a test image that is also in train: a leak
    shutil.copy(tr / "cross" / "0005.png", root / "test" / "cross" / "leak.png")
    # a near-duplicate only (mirrored): exact hashing must not report it
    Image.open(tr / "stripe" / "0010.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        root / "test" / "stripe" / "mirrored.png")


def test_pixel_and_file_fingerprints(tmp_path):
    make_tree_with_copies(tmp_path / "t")
    d = prepare(str(tmp_path / "t"))
    i = d.train.filenames.index(str(tmp_path / "t" / "train" / "circle" / "copy.png"))
    raw = (tmp_path / "t" / "train" / "circle" / "copy.png").read_bytes()
    assert d.train.file_sha256[i].tobytes() == hashlib.sha256(raw).digest()
    assert d.train.pixel_sha256[i].tobytes() == hashlib.sha256(
        np.ascontiguousarray(d.train.images[i]).tobytes()).digest()

    px = find_duplicates(d, by="pixels")
    assert px["summary"] == {"train_duplicate_groups": 2, "test_duplicate_groups": 0,
                             "test_images_in_train": 1, "groups_with_conflicting_labels": 0}
    assert px["across"][0]["test"].endswith("leak.png")
    assert px["across"][0]["train"][0].endswith("cross/0005.png")
    assert px["note"] == EXACT_ONLY
    files = find_duplicates(d, by="files")  # the BMP has other bytes: one group fewer
    assert files["summary"]["train_duplicate_groups"] == 1
    assert files["summary"]["test_images_in_train"] == 1

    idx = d.fingerprint_index("pixels")  # saved with the cache, memory-mapped
    rows = idx.lookup(d.test.pixel_sha256)
    assert (rows >= 0).all()  # every test image is in the index...
    leak = d.test.filenames.index(str(tmp_path / "t" / "test" / "cross" / "leak.png"))
    assert rows[leak] < len(d.train)  # ...and the leak resolves to its training copy


def test_python_release_fingerprints_records(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder)
    d = prepare(str(folder))
    rec = d.train.images[0].transpose(2, 0, 1).tobytes()  # the 3072-byte planar record
    assert d.train.file_sha256[0].tobytes() == hashlib.sha256(rec).digest()
    assert find_duplicates(d)["summary"]["test_images_in_train"] == 0


def test_dupes_command_text_and_json(tmp_path, capsys):
    make_tree_with_copies(tmp_path / "t")
    try:
        main(["data", "dupes", "--data", str(tmp_path / "t")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    assert "test images also in train: 1" in out and "leak: test" in out
    assert "exact copies only" in out
    try:
        main(["data", "dupes", "--data", str(tmp_path / "t"), "--json", "--by", "files"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["by"] == "files" and report["summary"]["train_duplicate_groups"] == 1
