"""The data layer: sources -> formats -> cache -> splits.

Every source (the official CIFAR-10 python release, an image-folder tree, or such a tree inside
a .tar/.tar.gz/.zip) becomes :class:`Dataset`: uint8 images N×H×W×C, int64 labels, class names
and source filenames. Decoding happens once: the arrays are cached as ``.npy`` files keyed by the
SHA-256 of the source and opened memory-mapped afterwards.

* :mod:`~cifarlab.data.sources`: where the data comes from, and the download;
* :mod:`~cifarlab.data.formats`: the python release, image-folder trees and archives;
* :mod:`~cifarlab.data.cache`: decode once, fingerprint once, open memory-mapped;
* :mod:`~cifarlab.data.splits`: validation split, train fraction, statistics;
* :mod:`~cifarlab.data.export`: every image back out as PNG.
"""

from cifarlab.data.cache import prepare, source_sha256
from cifarlab.data.dataset import Dataset, PreparedData, SplitData
from cifarlab.data.export import export_png
from cifarlab.data.load import load_data
from cifarlab.data.sources import (
    CIFAR10_MD5,
    CIFAR10_TARBALL,
    CIFAR10_URL,
    cache_dir,
    download_cifar10,
    resolve_source,
)
from cifarlab.data.splits import channel_stats, split, stratified_split

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_TARBALL",
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
    "source_sha256",
    "split",
    "stratified_split",
]
