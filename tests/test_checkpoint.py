"""Pause and resume: a continued run ends with the same weights as one straight through."""

from __future__ import annotations

import json

import pytest
import torch

from cifarlab.config import DataConfig, TrainConfig
from cifarlab.data import load_data
from cifarlab.errors import ConfigError, RunError
from cifarlab.trainer import train


def config(source, optimizer: str = "sgd") -> TrainConfig:
    cfg = TrainConfig(model="airnet", width=0.25, precision="fp32", tta=0)
    cfg.data = DataConfig(source=str(source), val_size=40)
    cfg.optim.batch_size = 64
    cfg.optim.epochs = 4.5  # a fractional last epoch, as budgets often are
    cfg.optim.optimizer = optimizer
    cfg.optim.ema_start_frac = 0.3  # weight averaging starts before the pause
    cfg.aug.cutout = 8
    return cfg


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_paused_and_continued_equals_straight_through(learnable, tmp_path, optimizer):
    cfg = config(learnable, optimizer)
    data = load_data(cfg.data)
    straight = train(cfg, data=data, evaluate_test=False, progress=False)

    ck = tmp_path / "ck"
    first = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck,
                  pause_at_epoch=2)
    assert first.stopped_early is not None and first.stopped_early.kind == "paused"
    assert len(first.history) == 2 and first.val_loss is not None  # measured at the pause
    assert first.test_acc is None  # the test split waits for the end
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 2 and state["averaging"]
    again = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck,
                  pause_at_epoch=4)
    rest = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck)
    assert rest.stopped_early is None
    same_weights(straight.model, rest.model)
    assert [r["train_loss"] for r in rest.history] == [r["train_loss"]
                                                       for r in straight.history]
    assert len(again.history) == 4 and rest.val_loss == straight.val_loss
    assert len(list(ck.glob("tensors-*.safetensors"))) == 1  # older ones are removed

    # finished: asking again trains nothing and returns the same model
    done = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck)
    same_weights(straight.model, done.model)


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_paused_inside_epochs_and_continued_equals_straight_through(learnable, tmp_path,
                                                                    optimizer):
    """Rungs of a multi-fidelity study fall anywhere, so pauses inside an epoch (before and
    after weight averaging starts, and once just before an epoch ends) must be exact too."""
    cfg = config(learnable, optimizer)
    data = load_data(cfg.data)
    straight = train(cfg, data=data, evaluate_test=False, progress=False)
    per_epoch = straight.history[0]["step"]
    ck = tmp_path / "ck"
    stops = [3, per_epoch + 5, 3 * per_epoch - 1]
    for at in stops:
        part = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck,
                     pause_at_step=at)
        assert part.stopped_early is not None and part.stopped_early.kind == "paused"
        assert part.history[-1]["step"] == at and part.val_loss is not None
        state = json.loads((ck / "state.json").read_text())
        assert state["step"] == at and state["in_epoch"] == at % per_epoch
    assert json.loads((ck / "state.json").read_text())["averaged"]  # saved apart, mid-epoch
    rest = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck)
    assert rest.stopped_early is None
    same_weights(straight.model, rest.model)
    assert rest.val_loss == straight.val_loss
    assert rest.history[-1]["step"] == straight.history[-1]["step"]


@pytest.fixture
def paused(learnable, tmp_path):
    """A 2-epoch run paused after its first epoch: (config, data, checkpoint folder)."""
    cfg = config(learnable)
    cfg.optim.epochs = 2
    data = load_data(cfg.data)
    ck = tmp_path / "ck"
    train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck, pause_at_epoch=1)
    return cfg, data, ck


def test_a_checkpoint_continues_only_with_its_own_config(paused):
    cfg, data, ck = paused
    other = cfg.with_values({"optim.lr": cfg.optim.lr * 2})
    with pytest.raises(ConfigError, match=r"another config \(optim\.lr"):
        train(other, data=data, evaluate_test=False, progress=False, checkpoint=ck)
    with pytest.raises(ConfigError, match="pause_at_epoch needs a checkpoint"):
        train(cfg, data=data, progress=False, pause_at_epoch=1)
    with pytest.raises(ConfigError, match="not both"):
        train(cfg, data=data, progress=False, checkpoint=ck, pause_at_epoch=1, pause_at_step=3)


def test_a_damaged_checkpoint_is_refused_and_names_the_file(paused):
    cfg, data, ck = paused
    tensors = next(ck.glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RunError, match=f"{tensors.name}: missing or not the file"):
        train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck)
    (ck / "state.json").write_text("{not json")
    with pytest.raises(RunError, match="damaged checkpoint"):
        train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ck)
