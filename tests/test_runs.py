"""Run folders, written by RunWriter and read back from the path alone."""

from __future__ import annotations

import json

import pytest
import torch

from cifarlab.callbacks import TrainResult, TrainState
from cifarlab.config import TrainConfig
from cifarlab.errors import RunError
from cifarlab.models import create_model
from cifarlab.runs import RunWriter, load_run, read_run


def _result(cfg: TrainConfig) -> TrainResult:
    torch.manual_seed(0)
    model = create_model(cfg.model, 3, cfg.width, 16)
    return TrainResult(model=model, config=cfg, classes=["a", "b", "c"], mean=[0.5] * 3,
                       std=[0.25] * 3, history=[{"epoch": 1}], train_seconds=1.0,
                       total_seconds=2.0, val_loss=1.0, val_acc=0.5, test_loss=1.1,
                       test_acc=0.4, stopped_early=None, data_sha256="d" * 64, source="x",
                       precision="fp32", device="cpu", extras={"doctor": [{"rule": "r"}]})


def _write(path, cfg: TrainConfig) -> TrainResult:
    result = _result(cfg)
    state = TrainState(cfg, result.model, torch.optim.SGD(result.model.parameters(), lr=0.1),
                       torch.device("cpu"), "fp32", 1, 1, history=result.history)
    writer = RunWriter(path)
    writer.on_train_start(state)
    assert json.loads((path / "config.json").read_text()) == cfg.to_dict()
    assert not (path / "summary.json").exists()  # not finished yet
    writer.on_epoch_end(state, result.history[0])
    writer.on_train_end(state, result)
    return result


def test_writer_then_reader_round_trip(tmp_path):
    cfg = TrainConfig(model="tutorial", tta=1)
    cfg.data.image_size = 16
    result = _write(tmp_path / "r", cfg)
    info = read_run(tmp_path / "r")
    assert info.classes == ["a", "b", "c"] and info.image_size == 16 and info.tta == 1
    assert info.summary["doctor"] == [{"rule": "r"}]
    assert info.summary["parameters"] == sum(p.numel() for p in result.model.parameters())
    run = load_run(tmp_path / "r")
    assert run.config == cfg and not run.model.training
    for k, v in result.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[k], v), k
    assert len(run.weights_sha256) == 64


def test_a_finished_run_is_never_overwritten(tmp_path):
    cfg = TrainConfig(model="tutorial")
    cfg.data.image_size = 16
    _write(tmp_path / "r", cfg)
    before = (tmp_path / "r" / "summary.json").read_bytes()
    with pytest.raises(RunError, match="already holds a finished run"):
        RunWriter(tmp_path / "r")
    assert (tmp_path / "r" / "summary.json").read_bytes() == before


def test_damaged_folders_are_named(tmp_path):
    cfg = TrainConfig(model="tutorial")
    cfg.data.image_size = 16
    _write(tmp_path / "r", cfg)
    (tmp_path / "r" / "summary.json").write_text("{}")
    with pytest.raises(RunError, match=r"r: damaged config.json or summary.json"):
        read_run(tmp_path / "r")
    _write(tmp_path / "s", cfg)
    (tmp_path / "s" / "model.safetensors").write_bytes(b"\0" * 10)
    read_run(tmp_path / "s")  # reading the config and summary does not touch the weights
    with pytest.raises(RunError, match=r"model.safetensors: cannot load weights"):
        load_run(tmp_path / "s")
