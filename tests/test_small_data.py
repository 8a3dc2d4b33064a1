"""A user's own small dataset works with defaults: every command on a 1,000-image folder tree
(10 classes, no test split, 48-pixel images in PNG and JPEG) with no options beyond the data."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, synthetic_images, write_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "folder"
    x, y = synthetic_images(100, size=48, seed=0, n_classes=10)
    write_tree(root, x[::2], y[::2], "train", classes=[f"c{k}" for k in range(10)], fmt="png")
    write_tree(root, x[1::2], y[1::2], "train", classes=[f"c{k}" for k in range(10)],
               fmt="jpg", start=500)
    return root


def test_every_command_with_defaults_on_a_small_folder(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_DATA", str(folder))
    monkeypatch.chdir(tmp_path)
    r = run_cli("data", "info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert sum(info["train_counts"]) == 800 and sum(info["test_counts"]) == 200
    assert run_cli("data", "dupes").returncode == 0

    r = run_cli("train", "-q", "--name", "own")
    assert r.returncode == 0, r.stderr
    assert "val: loss" in r.stdout and "test: loss" in r.stdout  # 80 validation images
    summary = json.loads((tmp_path / "runs" / "own" / "summary.json").read_text())
    assert summary["test_acc"] > 0.5, summary

    r = run_cli("evaluate", "runs/own", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(summary["test_acc"])  # both fp32
    image = next(folder.rglob("*.jpg"))
    r = run_cli("predict", "runs/own", str(image))
    assert r.returncode == 0 and r.stdout.count("%") == 5, r.stderr

    r = run_cli("doctor")
    assert r.returncode == 0, r.stdout + r.stderr

    r = run_cli("tune", "--trials", "2", "--name", "own")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--from-study", "studies/own", "--epochs", "1", "-q")
    assert r.returncode == 0, r.stderr
