"""``load_data(cfg)``: prepare the source through the cache, then split it."""

from __future__ import annotations

from cifarlab.config import DataConfig
from cifarlab.data.cache import prepare
from cifarlab.data.dataset import SplitData
from cifarlab.data.splits import split

__all__ = ["load_data"]


def load_data(cfg: DataConfig | None = None, source: str | None = None) -> SplitData:
    """Prepare the source, carve the validation split from train, compute train-only stats.

    The validation split defaults to 10% of the training split, at most 5,000 images
    (``cfg.val_size``; 0 trains on every training image).
    """
    cfg = cfg or DataConfig()
    return split(prepare(source, cfg), cfg)
