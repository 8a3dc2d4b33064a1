"""TensorBoard event files from `train --tensorboard` and `tune --tensorboard`, read back with
TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import call

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(folder: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"histograms": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_train_writes_what_the_doctor_saw(capsys, learnable, tmp_path):
    code, _, err = call(capsys, "train", "--data", str(learnable), "--width", "0.25", "--epochs",
                        "2", "--batch-size", "64", "--val-size", "40", "--name", "tb",
                        "--runs-dir", str(tmp_path / "runs"), "--tensorboard", "-q")
    assert code == 0, err
    acc = _read(tmp_path / "runs" / "tb" / "tensorboard")
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "epoch/val_loss", "epoch/val_acc", "final/test_acc",
                "doctor/grad_norm"):
        assert tag in tags, tags
    assert any(t.startswith("doctor/update_ratio/") for t in tags)
    assert any(t.startswith("doctor/active_fraction/") for t in tags)
    assert len(acc.Scalars("epoch/val_loss")) == 2  # one point per epoch
    assert acc.Tags()["histograms"]  # weight histograms


@pytest.mark.slow
def test_tune_writes_a_folder_per_trial(capsys, learnable, tmp_path):
    study = tmp_path / "study"
    code, _, err = call(capsys, "tune", "--data", str(learnable), "--study-dir", str(study),
                        "--val-size", "48", "--trials", "2", "--epochs", "0.5",
                        "--target-epochs", "0.5", "--top-k", "1", "--tensorboard", "-q")
    assert code == 0, err
    folders = sorted(p.name for p in (study / "tensorboard").iterdir())
    assert {"trial-0", "trial-1", "target-0"} <= set(folders), folders
    assert "epoch/val_loss" in _read(study / "tensorboard" / "trial-1").Tags()["scalars"]


def test_without_tensorboard_installed_it_says_what_to_install(monkeypatch, tmp_path):
    import sys

    from cifarlab.errors import ConfigError
    from cifarlab.tblog import TensorBoardWriter

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'cifarlab\[tensorboard\]'"):
        TensorBoardWriter(tmp_path / "tb")
