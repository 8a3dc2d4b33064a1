"""Carry CIFAR-10's original pixels to a lent GPU machine in two pieces instead of three.

The device tool moves at most 64 MiB a call, and the lossless archive is 170 MB (PNG-grade
compression at best). A lossless predictor (JPEG-LS's median edge detector per channel, then
red and blue minus green) and xz take the 60,000 images to about 100 MB:

    python bench/gpu_data.py pack cifar-10-lossless-python.tar.gz .gpudata1 .gpudata2
    python bench/gpu_data.py unpack .gpudata1 .gpudata2 --out /tmp/cifar-10-batches-py

``unpack`` rebuilds the pixels exactly (it checks their SHA-256 against the one ``pack``
recorded) and writes the CIFAR-10 python layout, which every cifarlab command reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import pickle
import sys
from pathlib import Path

import numpy as np

PART = "cifar.xz.part"
HEADER = "cifar.json"


def _digest(planes: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(planes.tobytes() + labels.astype(np.int64).tobytes()).hexdigest()


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.zeros_like(x)
    b = np.zeros_like(x)
    c = np.zeros_like(x)
    a[..., :, 1:] = x[..., :, :-1]
    b[..., 1:, :] = x[..., :-1, :]
    c[..., 1:, 1:] = x[..., :-1, :-1]
    return a, b, c


def _med(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def encode(planes: np.ndarray) -> np.ndarray:
    """3×N×32×32 uint8 -> residuals mod 256 of the same shape."""
    x = planes.astype(np.int16)
    r = x - _med(*_neighbours(x))
    r[0] -= r[1]
    r[2] -= r[1]
    return (r % 256).astype(np.uint8)


def decode(res: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode`, one pixel position at a time across all images."""
    r = res.astype(np.int16)
    r[0] += r[1]
    r[2] += r[1]
    out = np.zeros(r.shape, np.int16)
    h, w = r.shape[-2:]
    for i in range(h):
        for j in range(w):
            a = out[..., i, j - 1] if j else 0
            b = out[..., i - 1, j] if i else 0
            c = out[..., i - 1, j - 1] if i and j else 0
            a, b, c = (np.broadcast_to(np.asarray(v, np.int16), r.shape[:-2]) for v in (a, b, c))
            out[..., i, j] = (_med(a, b, c) + r[..., i, j]) % 256
    return out.astype(np.uint8)


def pack(src: str, dests: list[Path]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cifarlab.data import prepare

    data = prepare(str(Path(src).resolve()))
    images = np.concatenate([np.asarray(data.train.images[:]), np.asarray(data.test.images[:])])
    labels = np.concatenate([data.train.labels, data.test.labels]).astype(np.int64)
    planes = np.ascontiguousarray(images.transpose(3, 0, 1, 2))  # C×N×H×W
    header = {"n_train": len(data.train), "n_test": len(data.test),
              "classes": list(data.train.classes), "sha256": _digest(planes, labels),
              "parts": len(dests)}
    blob = lzma.compress(encode(planes).tobytes() + labels.astype(np.uint8).tobytes(), preset=6)
    header["bytes"] = len(blob)
    size = -(-len(blob) // len(dests))
    for i, d in enumerate(dests):
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{PART}{i}").write_bytes(blob[i * size:(i + 1) * size])
        (d / HEADER).write_text(json.dumps(header))
    print(json.dumps(header))


def unpack(srcs: list[Path], out: Path) -> None:
    header = json.loads((srcs[0] / HEADER).read_text())
    parts = sorted((p for s in srcs for p in s.glob(f"{PART}*")),
                   key=lambda p: int(p.name.removeprefix(PART)))
    if len(parts) != header["parts"]:
        raise SystemExit(f"found {len(parts)} of {header['parts']} parts in {srcs}")
    raw = lzma.decompress(b"".join(p.read_bytes() for p in parts))
    n = header["n_train"] + header["n_test"]
    planes = decode(np.frombuffer(raw[:3 * n * 1024], np.uint8).reshape(3, n, 32, 32))
    labels = np.frombuffer(raw[3 * n * 1024:], np.uint8).astype(np.int64)
    if _digest(planes, labels) != header["sha256"]:
        raise SystemExit("the unpacked pixels do not match the packed ones (SHA-256 differs)")
    flat = planes.transpose(1, 0, 2, 3).reshape(n, 3072)  # the release's R, G, B planes
    out.mkdir(parents=True, exist_ok=True)
    nt = header["n_train"]
    batches = [(f"data_batch_{k + 1}", slice(k * nt // 5, (k + 1) * nt // 5)) for k in range(5)]
    for name, sl in [*batches, ("test_batch", slice(nt, n))]:
        with open(out / name, "wb") as f:
            pickle.dump({"data": np.ascontiguousarray(flat[sl]),
                         "labels": labels[sl].tolist()}, f, protocol=2)
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({"label_names": header["classes"]}, f, protocol=2)
    print(f"unpacked {n} images to {out}, SHA-256 {header['sha256'][:16]}… checked")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("src")
    pk.add_argument("dests", nargs="+", type=Path)
    up = sub.add_parser("unpack")
    up.add_argument("srcs", nargs="+", type=Path)
    up.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "pack":
        pack(a.src, a.dests)
    else:
        unpack(a.srcs, a.out)


if __name__ == "__main__":
    main()
