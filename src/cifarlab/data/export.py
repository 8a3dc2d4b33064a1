"""Export a prepared dataset as PNG files in class folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab.data.dataset import PreparedData

__all__ = ["export_png"]


def export_png(data: PreparedData, to: Path) -> int:
    """Write every image as ``to/<split>/<class>/<name>.png``; returns the number written."""
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
