"""Where the data comes from: ``--data``, ``$CIFARLAB_DATA``, the user cache, and the download of
the official CIFAR-10 release into that cache (checked against its published MD5)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from cifarlab.errors import DataError

__all__ = ["CIFAR10_MD5", "CIFAR10_TARBALL", "CIFAR10_URL", "cache_dir", "download_cifar10",
           "resolve_source"]

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"


def cache_dir() -> Path:
    """``$CIFARLAB_CACHE``, else ``$XDG_CACHE_HOME/cifarlab``, else ``~/.cache/cifarlab``."""
    if env := os.environ.get("CIFARLAB_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifarlab"


def resolve_source(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the data comes from: ``explicit`` (``--data``), ``$CIFARLAB_DATA``, the user cache.

    When none is given and the cache has no copy, the official tarball is downloaded into the
    cache and checked against its published MD5.
    """
    for given, what in ((explicit, "--data"), (os.environ.get("CIFARLAB_DATA"), "CIFARLAB_DATA")):
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise DataError(
                    f"{what}={given}: no such file or folder. Point it at a "
                    "cifar-10-python.tar.gz, a cifar-10-batches-py folder, or an image-folder "
                    "tree (train/<class>/*, test/<class>/*) or archive of one."
                )
            return path
    cached = cache_dir() / CIFAR10_TARBALL
    if cached.exists():
        return cached
    url = os.environ.get("CIFARLAB_DOWNLOAD_URL", CIFAR10_URL)
    download_cifar10(cached, url=url)
    return cached


def download_cifar10(
    dest: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 30.0
) -> Path:
    """Download ``url`` to ``dest`` atomically, refusing it unless its MD5 is ``md5``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(
                f"Downloaded {url} but its MD5 is {digest.hexdigest()}, not the published "
                f"{md5}; the file was discarded. Try again, or download it yourself and pass "
                "--data PATH."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataError(
            f"Could not download CIFAR-10 from {url} ({exc}). Working offline? Point cifarlab "
            f"at a local copy: pass --data PATH or set CIFARLAB_DATA=PATH (a {CIFAR10_TARBALL}, "
            "a cifar-10-batches-py folder, or an image-folder tree or archive), or copy "
            f"{CIFAR10_TARBALL} to {dest}."
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest
