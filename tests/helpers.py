"""Helpers shared by the tests: tiny synthetic datasets written in every supported format, the
CLI runner, and small trained runs. Tests import from here, never from each other."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab.cli import main

CLASSES = ["circle", "cross", "stripe", "square"]


CIFARLAB = shutil.which("cifarlab") or str(Path(sys.executable).parent / "cifarlab")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CIFARLAB, *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ.copy(), timeout=300)


def call(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def synthetic_images(n_per_class: int, size: int = 32, seed: int = 0,
                     n_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k draws a distinct shape at a jittered position, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for k in range(n_classes):
        for _ in range(n_per_class):
            cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
            r = size // 5
            if k % 4 == 0:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            elif k % 4 == 1:
                m = (np.abs(yy - cy) < 2) | (np.abs(xx - cx) < 2)
            elif k % 4 == 2:
                m = (xx // 3) % 2 == 0
            else:
                m = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            img = rng.normal(100, 20, (size, size, 3))
            color = np.array([60 + 60 * (k % 3), 200 - 40 * (k % 4), 90 + 30 * k]) % 256
            img[m] = color + rng.normal(0, 10, 3)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(k)
    return np.stack(images), np.array(labels, dtype=np.int64)


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, split: str = "train",
               classes: list[str] = CLASSES, fmt: str = "png", start: int = 0) -> list[Path]:
    paths = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True), start=start):
        d = root / split / classes[y]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:04d}.{fmt}"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def cifar_batch(images: np.ndarray, labels: np.ndarray, prefix: str, start: int = 0) -> bytes:
    """A batch in the official format: planes R,G,B each row-major, byte-string keys."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    d = {
        b"batch_label": prefix.encode(),
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"{prefix}_{start + i}.png".encode() for i in range(len(images))],
    }
    return pickle.dumps(d, protocol=2)


def write_cifar_python(folder: Path, classes: list[str] = CLASSES, n_per_class: int = 6,
                       n_batches: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = synthetic_images(n_per_class * n_batches, seed=1, n_classes=len(classes))
    te_x, te_y = synthetic_images(n_per_class, seed=2, n_classes=len(classes))
    perm = np.random.default_rng(0).permutation(len(tr_y))
    tr_x, tr_y = tr_x[perm], tr_y[perm]
    for b, chunk in enumerate(np.array_split(np.arange(len(tr_y)), n_batches)):
        (folder / f"data_batch_{b + 1}").write_bytes(cifar_batch(tr_x[chunk], tr_y[chunk], "tr",
                                                                  int(chunk[0])))
    (folder / "test_batch").write_bytes(cifar_batch(te_x, te_y, "te"))
    meta = {b"label_names": [c.encode() for c in classes], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return tr_x, tr_y, te_x, te_y


def tar_folder(src: Path, dest: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=arcname)
    return dest


def zip_folder(src: Path, dest: Path, arcname: str) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"{arcname}/{p.relative_to(src)}")
    return dest


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, *args: str, ready_timeout: float = 60) -> Iterator[str]:
    """`cifarlab serve RUN ARGS` on a free loopback port, until its model is ready; yields its
    URL and stops it afterwards."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([CIFARLAB, "serve", str(run), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read() if proc.stderr else "server died")
            if time.monotonic() > deadline:
                raise AssertionError("the server's model never became ready")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_tiny_run(root: Path, name: str, epochs: int = 8, seed: int = 0) -> Path:
    """A trained tutorial model on the synthetic 4-class set: a real run folder."""
    from cifarlab.config import DataConfig
    from cifarlab.models import default_config
    from cifarlab.runs import RunWriter
    from cifarlab.trainer import train

    data = root / "cifar-10-batches-py"
    if not data.exists():
        write_cifar_python(data, n_per_class=60, n_batches=2)
    cfg = default_config("tutorial")
    cfg.data = DataConfig(source=str(data), val_size=40)
    cfg.optim.epochs = epochs
    cfg.seed = seed
    train(cfg, [RunWriter(root / "runs" / name)], progress=False)
    return root / "runs" / name
