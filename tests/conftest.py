"""Fixtures: an isolated environment for every test, and tiny synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import synthetic_images, train_tiny_run, write_cifar_python, write_tree


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the real data or the user's cache."""
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    monkeypatch.delenv("CIFARLAB_DOWNLOAD_URL", raising=False)
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    import torch

    torch.set_num_threads(2)


@pytest.fixture
def tree(tmp_path) -> Path:
    """An image-folder tree with train and test splits in PNG."""
    root = tmp_path / "tree"
    x, y = synthetic_images(12, seed=3)
    write_tree(root, x, y, "train")
    xt, yt = synthetic_images(4, seed=4)
    write_tree(root, xt, yt, "test")
    return root


@pytest.fixture
def learnable(tmp_path) -> Path:
    """A cifar-10-batches-py folder large enough to learn from (4 classes × 120 train)."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder, n_per_class=60, n_batches=2)
    return folder


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A trained tutorial model on the synthetic 4-class set (a real run folder), shared by
    the serving tests; runs/ beside it is their runs root."""
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(root / "cache"))
        return train_tiny_run(root, "tiny")


@pytest.fixture(scope="session")
def other_run_dir(run_dir) -> Path:
    """A second run of the same model with other weights, beside ``run_dir``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(run_dir.parent.parent / "cache"))
        return train_tiny_run(run_dir.parent.parent, "tiny-b", epochs=2, seed=1)
