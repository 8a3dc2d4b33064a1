from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifarlab.builders import build_model
from cifarlab.callbacks import Callback, StopReason
from cifarlab.config import DataConfig, TrainConfig
from cifarlab.data import load_data
from cifarlab.errors import ConfigError, RunError
from cifarlab.infer import (
    Normalizer,
    Predictor,
    calibrated_loss,
    loss_and_accuracy,
    predict_logits,
    to_device_images,
)
from cifarlab.loader import DeviceLoader
from cifarlab.runs import RunWriter, load_run
from cifarlab.trainer import train
from helpers import synthetic_images, write_tree


def small_config(source, **optim) -> TrainConfig:
    cfg = TrainConfig(model="airnet", width=0.25, precision="fp32", tta=1)
    cfg.data = DataConfig(source=str(source), val_size=40)
    cfg.optim.batch_size = 64
    cfg.optim.epochs = 6
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def test_learns_a_small_synthetic_dataset_to_near_perfect_accuracy(learnable, tmp_path):
    result = train(small_config(learnable), [RunWriter(tmp_path / "run")], progress=False)
    assert result.test_acc is not None and result.test_acc >= 0.97, result.history
    assert result.val_acc >= 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_same_weights_different_seed_different(learnable):
    cfgs = [small_config(learnable, epochs=1.0) for _ in range(3)]
    cfgs[2].seed = 1
    data = load_data(cfgs[0].data)
    states = [train(c, data=data, evaluate_test=False, progress=False).model.state_dict()
              for c in cfgs]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_callbacks_see_steps_and_epochs_and_can_stop(learnable):
    class Recorder(Callback):
        def __init__(self):
            self.steps, self.epochs, self.started = [], [], False

        def on_train_start(self, state):
            self.started = True

        def on_step_end(self, state, loss, inputs, labels):
            self.steps.append(float(loss))
            assert inputs.shape[0] == labels.shape[0] == 64

        def on_epoch_end(self, state, metrics):
            self.epochs.append(metrics)
            if metrics["epoch"] == 2:
                state.stop(StopReason("test", "enough", "two epochs are enough"))

    rec = Recorder()
    result = train(small_config(learnable), [rec], evaluate_test=False, progress=False)
    assert rec.started and len(rec.epochs) == 2
    assert len(rec.steps) == 2 * (440 // 64)
    assert result.stopped_early == StopReason("test", "enough", "two epochs are enough")
    assert str(result.stopped_early) == "test: two epochs are enough"
    assert {"train_loss", "val_loss", "val_acc", "seconds"} <= set(rec.epochs[0])


def test_loader_augments_whole_batches(learnable):
    cfg = small_config(learnable)
    data = load_data(cfg.data)
    norm = Normalizer(data.mean, data.std, torch.device("cpu"))
    plain = norm(torch.from_numpy(np.asarray(data.train.images)).permute(0, 3, 1, 2))
    cfg.aug.translate, cfg.aug.flip = 0, False
    loader = DeviceLoader(data.train, cfg, norm, torch.device("cpu"))
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert any(torch.allclose(x[0], p) for p in plain)  # no augmentation: unchanged images

    cfg.aug.flip = True
    loader = DeviceLoader(data.train, cfg, norm, torch.device("cpu"))
    idx = torch.arange(8)
    even = loader._augment(loader.images[idx], idx)
    loader.epoch = 1
    odd = loader._augment(loader.images[idx], idx)
    for i in range(8):  # every image is mirrored on exactly one of two consecutive epochs
        flipped = [torch.equal(v[i], plain[i].flip(-1)) for v in (even, odd)]
        same = [torch.equal(v[i], plain[i]) for v in (even, odd)]
        assert sorted(flipped) == [False, True] and sorted(same) == [False, True]

    cfg.aug.flip, cfg.aug.translate = False, 2
    loader = DeviceLoader(data.train, cfg, norm, torch.device("cpu"))
    shifted = loader._augment(loader.images[idx], idx)
    padded = torch.nn.functional.pad(plain[:8], (2, 2, 2, 2), mode="reflect")
    for i in range(8):  # each output is one of the 25 crops of its padded image
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted[i], c) for c in crops)

    cfg.aug.translate, cfg.aug.cutout = 0, 8
    loader = DeviceLoader(data.train, cfg, norm, torch.device("cpu"))
    cut = loader._augment(loader.images[idx], idx)
    zeros = (cut == 0).all(dim=1).sum(dim=(1, 2))
    assert ((zeros >= 16) & (zeros <= 64)).all()  # an 8×8 hole, clipped at the border


def _ce(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(labels)))


def test_calibrated_loss_is_the_cross_entropy_at_the_best_temperature():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=g).numpy()
    # an overconfident model: right 70% of the time, with huge margins either way
    logits = torch.randn(2000, 10, generator=g)
    right = torch.rand(2000, generator=g) < 0.7
    logits[torch.arange(2000)[right], torch.from_numpy(labels)[right]] += 3.0
    logits *= 6.0
    cal, temperature = calibrated_loss(logits, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(50.0), 4001))
    brute = min((_ce(logits / t, labels), t) for t in grid)
    assert cal == pytest.approx(brute[0], abs=1e-6)
    assert temperature == pytest.approx(brute[1], rel=2e-3)
    assert temperature > 1.5 and cal < _ce(logits, labels) - 0.5  # overconfident: cooled down
    # what is left after calibration does not depend on the logits' scale: a model that only
    # sharpens its softmax (less label smoothing) gains nothing
    for k in (0.1, 0.5, 3.0):
        assert calibrated_loss(logits * k, labels)[0] == pytest.approx(cal, abs=1e-6)


def test_calibrated_loss_never_exceeds_the_plain_loss_and_passes_non_finite_through():
    # calibrated by construction (labels drawn from the model's own softmax): T near 1, and
    # the loss at most the plain one
    g = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(20000, 5, generator=g)
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1).numpy()
    cal, t = calibrated_loss(z, labels)
    assert cal <= _ce(z, labels) + 1e-12 and t == pytest.approx(1.0, abs=0.03)
    z, labels = z[:4], labels[:4]
    nan = z.clone()
    nan[0, 0] = float("nan")
    out = calibrated_loss(nan, labels)
    assert np.isnan(out[0]) and out[1] == 1.0
    inf = z.clone()
    inf[1, 0] = float("inf")
    out = calibrated_loss(inf, labels)
    assert not np.isfinite(out[0]) and out[1] == 1.0


def test_evaluate_uses_eval_mode_and_restores_it(learnable):
    cfg = small_config(learnable, epochs=0.5)
    data = load_data(cfg.data)
    model = train(cfg, data=data, evaluate_test=False, progress=False).model
    model.train()
    images = to_device_images(data.test.images, torch.device("cpu"))
    norm, cpu = Normalizer(data.mean, data.std, torch.device("cpu")), torch.device("cpu")
    l1, a1 = loss_and_accuracy(predict_logits(model, images, norm, cpu), data.test.labels)
    assert model.training  # restored
    l2, _ = loss_and_accuracy(predict_logits(model, images[:7], norm, cpu),
                              data.test.labels[:7])
    l3, a3 = loss_and_accuracy(predict_logits(model, images, norm, cpu), data.test.labels)
    assert (l1, a1) == (l3, a3)  # BatchNorm used running stats, not batch stats
    assert np.isfinite(l2)


def test_run_folder_reloads_to_identical_predictions(learnable, tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    cfg = small_config(learnable, epochs=1.0)
    result = train(cfg, [RunWriter(run_dir)], progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "summary.json"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_acc", "test_acc", "val_loss", "test_loss", "train_seconds", "data_sha256",
                "classes", "versions", "weights_sha256", "parameters"):
        assert summary[key] is not None, key
    assert summary["versions"]["torch"] == torch.__version__
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert load_file(str(run_dir / "model.safetensors"))  # plain tensors, no pickle
    weights = (run_dir / "model.safetensors").read_bytes()
    assert summary["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert summary["parameters"] == sum(p.numel() for p in result.model.parameters())
    assert summary["tta"] == cfg.tta

    run = load_run(run_dir)
    assert run.config == cfg and not run.model.training
    data = load_data(cfg.data)
    out = Predictor.from_run(run).evaluate(data.test)
    assert out["tta"] == cfg.tta and out["precision"] == summary["test_precision"] == "fp32"
    assert out["accuracy"] == pytest.approx(result.test_acc)
    assert out["loss"] == pytest.approx(result.test_loss, rel=1e-5)


def test_predict_files_any_size_and_format(learnable, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    train(small_config(learnable, epochs=4.0), [RunWriter(run_dir)], progress=False)
    data = load_data(DataConfig(source=str(learnable), val_size=0))
    big = Image.fromarray(np.asarray(data.test.images[0])).resize((97, 97))
    big.save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.asarray(data.test.images[-1])).convert("RGBA").save(tmp_path / "b.png")
    answer = Predictor.from_run(run_dir).predict_files([tmp_path / "a.jpg", tmp_path / "b.png"],
                                                       top_k=2)
    out = answer["predictions"]
    assert answer["model"] == "run" and answer["tta"] == 1 and len(answer["version"]) == 12
    assert [len(o["top"]) for o in out] == [2, 2]
    assert out[0]["filename"] == str(tmp_path / "a.jpg")
    assert out[0]["sha256"] == hashlib.sha256((tmp_path / "a.jpg").read_bytes()).hexdigest()
    assert out[0]["top"][0]["class"] == data.classes[data.test.labels[0]]
    assert out[1]["top"][0]["class"] == data.classes[data.test.labels[-1]]
    assert out[0]["top"][0]["probability"] >= out[0]["top"][1]["probability"]


def test_bad_runs_and_configs_are_reported(tmp_path, learnable):
    with pytest.raises(RunError, match="no such run folder"):
        load_run(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(RunError, match="missing summary.json"):
        load_run(tmp_path / "half")
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        train(small_config(learnable, lr=-1.0), progress=False)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) lrr"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"config.optim.epochs: expected float"):
        TrainConfig.from_dict({"optim": {"epochs": "ten"}})


@pytest.mark.parametrize("name", ["tutorial", "resnet18"])
def test_other_models_train_a_step(name, learnable):
    cfg = small_config(learnable, epochs=0.2)
    cfg.model, cfg.width = name, 0.125
    result = train(cfg, evaluate_test=False, progress=False)
    assert np.isfinite(result.history[0]["train_loss"])


def test_bf16_autocast_trains(learnable):
    cfg = small_config(learnable, epochs=0.3)
    cfg.precision = "bf16"
    result = train(cfg, evaluate_test=False, progress=False)
    assert result.precision == "bf16" and np.isfinite(result.val_loss)


def test_tiny_dataset_smaller_than_a_batch(tmp_path):
    x, y = synthetic_images(3)
    write_tree(tmp_path / "t", x, y, "train")
    cfg = small_config(tmp_path / "t", epochs=1.0)
    cfg.data.val_size = 0
    result = train(cfg, progress=False)
    assert len(result.history) == 1 and result.test_acc is not None


@pytest.mark.slow
def test_compiled_model_trains_and_saves_like_the_eager_one(learnable, tmp_path):
    """``compile: true`` compiles the model in place: it learns as the eager one does, and its
    weights keep their names, so a run folder loads into an uncompiled model."""
    cfg = small_config(learnable, epochs=3)
    eager = train(cfg, data=load_data(cfg.data), progress=False)
    cfg.compile = True
    compiled = train(cfg, [RunWriter(tmp_path / "run")], data=load_data(cfg.data), progress=False)
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())
    assert compiled.test_acc >= eager.test_acc - 0.1, (compiled.test_acc, eager.test_acc)
    assert compiled.history[-1]["train_loss"] < compiled.history[0]["train_loss"]
    fresh = build_model(cfg, len(eager.classes), 32)
    fresh.load_state_dict(compiled.model.state_dict())
