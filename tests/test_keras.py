"""Keras 3 models: the bridge, the three ways to name one, run folders, the Keras engine, export,
and the whole path (train, tune, doctor, evaluate, predict, serve, export) on a builder file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.builders import build_model, model_kind
from cifarlab.config import ConfigError, DataConfig, TrainConfig, resolve_key
from cifarlab.errors import ModelError
from cifarlab.kerasfast import coverage
from cifarlab.kerasnet import KerasModule, import_keras
from cifarlab.models import default_config
from cifarlab.runs import RunWriter, load_run
from cifarlab.trainer import train
from helpers import CIFARLAB, call, run_cli, serving

keras = import_keras()

BUILDER = textwrap.dedent('''
    import keras

    def build_model(input_shape, num_classes, units=16, dropout=0.0):
        """A Keras tutorial-style CNN that ends in a softmax, as Keras users write them."""
        return keras.Sequential([
            keras.Input(input_shape),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(num_classes, activation="softmax"),
        ])

    def torch_model(input_shape, num_classes):
        import torch.nn as nn
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * input_shape[0] * input_shape[1],
                                                     num_classes))

    def wrong_head(input_shape, num_classes):
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(num_classes + 1)])
''')


@pytest.fixture
def builder(tmp_path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(BUILDER)
    return path


def _config(model: str, data: Path, **args) -> TrainConfig:
    cfg = default_config(model)
    cfg.data = DataConfig(source=str(data), val_size=40)
    cfg.optim.epochs = 3
    cfg.optim.batch_size = 32
    cfg.model_args = args
    return cfg


# ------------------------------------------------------------------------------ the bridge


def test_channels_last_batches_reach_keras_without_a_copy():
    seen: list[torch.Tensor] = []

    class Spy(keras.layers.Layer):
        def call(self, x):
            seen.append(x)
            return x

    inp = keras.Input((8, 8, 3))
    net = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(Spy()(inp))))
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    seen.clear()  # (building the functional model traced it once)
    KerasModule(net)(x)
    assert seen[0].shape == (4, 8, 8, 3)
    assert seen[0].data_ptr() == x.data_ptr() and seen[0].is_contiguous()  # a view


def test_train_and_eval_reach_keras_layers():
    torch.manual_seed(0)
    net = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                            keras.layers.Dropout(0.5), keras.layers.Dense(3)])
    m = KerasModule(net)
    x = torch.randn(8, 3, 4, 4)
    m.eval()
    assert torch.equal(m(x), m(x))  # no dropout
    m.train()
    assert not torch.equal(m(x), m(x))  # dropout on


def test_a_softmax_head_gives_log_probabilities_whose_softmax_is_the_models():
    net = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(3, activation="softmax")])
    m = KerasModule(net).eval()
    assert m.outputs_probabilities
    x = torch.randn(5, 3, 4, 4)
    probs = net(x.permute(0, 2, 3, 1))
    assert torch.allclose(torch.softmax(m(x), 1), probs, atol=1e-6)
    # and cross-entropy on it is Keras's categorical cross-entropy
    y = torch.tensor([0, 1, 2, 0, 1])
    ce = torch.nn.functional.cross_entropy(m(x), y)
    kce = keras.losses.SparseCategoricalCrossentropy()(y, probs)
    assert float(ce.detach()) == pytest.approx(float(kce.detach()), rel=1e-5)


def test_state_dict_has_each_weight_once_and_loads_into_a_rebuild():
    a = build_model(default_config("keras-cnn").with_values(
        {"model_args": {"filters": 4, "units": 8}}), 4, 16)
    sd = a.state_dict()
    assert len(sd) == len(a.keras_model.weights)
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    b = build_model(default_config("keras-cnn").with_values(
        {"model_args": {"filters": 4, "units": 8}, "seed": 1}), 4, 16)
    x = torch.randn(3, 3, 16, 16)
    assert not torch.allclose(a.eval()(x), b.eval()(x))
    b.load_state_dict(sd)  # layer names differ (keras numbers them per process), order does not
    assert torch.equal(a(x), b(x))


def _graph_model():
    """A functional model that exercises the fast path's layers: strided 'same' convolutions
    (asymmetric padding), GELU, Add, Concatenate, pooling, BatchNormalization, softmax."""
    inp = keras.Input((15, 15, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="gelu")(inp)
    h = keras.layers.Add()([h, keras.layers.Conv2D(8, 1)(h)])
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Concatenate()([keras.layers.AveragePooling2D(2)(h),
                                    keras.layers.MaxPooling2D(2)(h)])
    h = keras.layers.Dense(6, activation="tanh")(keras.layers.GlobalMaxPooling2D()(h))
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax")(h)), (3, 15, 15)


@pytest.mark.parametrize("which", ["keras-cnn", "keras-dense", "graph"])
def test_the_fast_path_computes_what_keras_computes(which):
    """Outputs, gradients and BatchNormalization's moving statistics of the PyTorch-kernel path
    equal Keras's own layers' (fp32)."""
    torch.manual_seed(0)
    if which == "graph":
        net, shape = _graph_model()
    else:
        cfg = default_config(which).with_values({"model_args": {"dropout": 0.0}})
        net, shape = build_model(cfg, 10, 32).keras_model, (3, 32, 32)
    fast, slow = KerasModule(net), KerasModule(net, fast=False)
    converted, total = coverage(net)
    assert fast.fast and converted == total - 1  # every layer but the Input
    x = torch.randn(8, *shape).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast.eval()(x), slow.eval()(x), atol=1e-5)
    stats = [v.value.clone() for v in net.non_trainable_weights]
    results = []
    for m in (fast, slow):
        for v, t in zip(net.non_trainable_weights, stats, strict=True):
            v.assign(t)
        y = m.train()(x)
        grads = torch.autograd.grad(y.square().sum(),
                                    [p for p in m.parameters() if p.requires_grad])
        results.append((y, grads, [v.value.clone() for v in net.non_trainable_weights]))
    (ya, ga, sa), (yb, gb, sb) = results
    assert torch.allclose(ya, yb, atol=1e-5)
    # summation order differs, and some gradients are zero up to rounding (a bias in front of
    # BatchNormalization): compare the whole gradient as one vector
    a, b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
    assert float((a - b).norm()) <= 1e-5 * float(b.norm())
    for a, b in zip(sa, sb, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_deep_copy_runs_on_its_own_weights():
    """The doctor copies a model to test it fresh: the copy's fast path must use the copy."""
    import copy

    cfg = default_config("keras-cnn").with_values(
        {"model_args": {"filters": 4, "units": 8, "dropout": 0.0}})
    original = build_model(cfg, 4, 16).eval()
    clone = copy.deepcopy(original).eval()
    x = torch.randn(2, 3, 16, 16)
    before = original(x)
    assert torch.equal(clone(x), before)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    assert torch.equal(original(x), before)
    moved = clone(x)
    assert not torch.allclose(moved, before)
    assert torch.allclose(moved, KerasModule(clone.keras_model, fast=False).eval()(x),
                          rtol=1e-5, atol=1e-5)


def test_seeded_builds_repeat_and_leave_other_generators_alone():
    import random

    cfg = default_config("keras-cnn").with_values({"model_args": {"filters": 4, "units": 8}})
    np.random.seed(123)
    random.seed(123)
    a = build_model(cfg, 4, 16)
    after = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    assert after == expected  # the user's NumPy and Python generators are as they were
    b = build_model(cfg, 4, 16)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)  # same seed, same initial weights


# ------------------------------------------------------------------------------ naming one


def test_model_kinds_and_a_clear_error_for_anything_else():
    assert model_kind("keras-cnn") == "registry"
    assert model_kind("nets/small.keras") == "keras-file"
    assert model_kind("nets.py:build_model") == "builder"
    assert model_kind("mypkg.nets:build_model") == "builder"
    with pytest.raises(ModelError, match=r"registered name .*\.keras file, or a builder"):
        model_kind("vgg16")


def test_builders_keras_and_torch(builder):
    cfg = default_config(f"{builder}:build_model").with_values({"model_args.units": 24})
    m = build_model(cfg, 4, 16)
    assert isinstance(m, KerasModule) and m.outputs_probabilities
    dense = [layer for layer in m.keras_model.layers if type(layer).__name__ == "Dense"]
    assert dense[0].units == 24
    t = build_model(default_config(f"{builder}:torch_model"), 4, 16)
    assert isinstance(t, torch.nn.Sequential)


def test_builder_errors_name_the_problem(builder):
    with pytest.raises(ModelError, match="does not take layers"):
        build_model(default_config(f"{builder}:build_model").with_values(
            {"model_args.layers": 3}), 4, 16)
    with pytest.raises(ModelError, match=r"output for 2 images is \(2, 5\).*\(2, 4\)"):
        build_model(default_config(f"{builder}:wrong_head"), 4, 16)
    with pytest.raises(ModelError, match="has no function 'nope'"):
        build_model(default_config(f"{builder}:nope"), 4, 16)
    with pytest.raises(ModelError, match="no such file"):
        build_model(default_config("missing.py:build"), 4, 16)


def test_keras_files_load_in_safe_mode_only(tmp_path):
    ok = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                           keras.layers.Dense(4)])
    ok.save(tmp_path / "ok.keras")
    m = build_model(default_config(str(tmp_path / "ok.keras")), 4, 16)
    assert isinstance(m, KerasModule)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(m.eval()(x), ok(x.permute(0, 2, 3, 1)))  # its own weights

    bad = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Lambda(lambda x: x * 2),
                            keras.layers.Flatten(), keras.layers.Dense(4)])
    bad.save(tmp_path / "bad.keras")
    with pytest.raises(ModelError, match="would run Python code stored in the file"):
        build_model(default_config(str(tmp_path / "bad.keras")), 4, 16)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="junk.keras: not a loadable Keras model"):
        build_model(default_config(str(tmp_path / "junk.keras")), 4, 16)


def test_model_args_are_config_keys():
    assert resolve_key("model_args.units") == "model_args.units"
    cfg = TrainConfig().with_values({"model_args.units": 64, "model_args.dropout": 0.1})
    assert cfg.model_args == {"units": 64, "dropout": 0.1}
    assert TrainConfig.from_dict(json.loads(cfg.to_json())).model_args == cfg.model_args
    with pytest.raises(ConfigError, match="model_args.units"):
        TrainConfig().with_values({"model_args.units": {"a": 1}}).validate()


def test_without_keras_it_says_what_to_install(tmp_path):
    for command in (["train"], ["tune", "--trials", "1"]):
        code = ("import sys; sys.modules['keras'] = None\n"
                "from cifarlab.cli import main\n"
                f"main({[*command, '--model', 'keras-cnn', '--data', 'nowhere']!r})\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode != 0, command
        assert "pip install 'cifarlab[keras]'" in r.stderr and "Traceback" not in r.stderr, \
            (command, r.stderr)


# ------------------------------------------------------------------------------ training


def test_keras_cnn_learns_and_its_run_folder_rebuilds_it(learnable, tmp_path):
    cfg = _config("keras-cnn", learnable, filters=8, units=16)
    result = train(cfg, [RunWriter(tmp_path / "run")], progress=False)
    assert result.val_acc is not None and result.val_acc > 0.6, result.history
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["framework"] == "keras" and summary["model_source"]["kind"] == "registry"
    assert (tmp_path / "run" / "keras_model.json").exists()
    run = load_run(tmp_path / "run")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(run.model(x), result.model.eval()(x))


def test_a_keras_file_trains_from_its_own_weights_and_rebuilds_without_the_file(learnable,
                                                                                 tmp_path):
    net = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])
    path = tmp_path / "mine.keras"
    net.save(path)
    cfg = _config(str(path), learnable)
    result = train(cfg, [RunWriter(tmp_path / "run")], progress=False)
    path.unlink()  # the run folder alone rebuilds it
    run = load_run(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(run.model(x), result.model.eval()(x))


def test_a_builders_run_rebuilds_without_the_builder_file(learnable, tmp_path, builder):
    cfg = _config(f"{builder}:build_model", learnable, units=8)
    cfg.optim.epochs = 1
    result = train(cfg, [RunWriter(tmp_path / "run")], progress=False)
    builder.unlink()
    run = load_run(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(run.model(x), result.model.eval()(x))


@pytest.mark.slow
def test_the_keras_engine_trains_with_model_fit(learnable, tmp_path, builder):
    r = run_cli("train", "--model", f"{builder}:build_model", "--data", str(learnable),
                "--val-size", "40", "--epochs", "4", "--batch-size", "32", "--engine", "keras",
                "--name", "fit", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "runs" / "fit" / "summary.json").read_text())
    assert summary["epochs_run"] == 4 and summary["val_acc"] > 0.5, summary
    rows = [json.loads(line) for line in
            (tmp_path / "runs" / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    r = run_cli("train", "--model", "tutorial", "--data", str(learnable), "--engine", "keras",
                "--epochs", "1", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode != 0 and "needs a Keras model" in r.stderr


# ------------------------------------------------------------------------------ the whole path


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_a_keras_builder_goes_through_every_command(learnable, tmp_path, builder):
    """train -> tune (over the builder's own arguments) -> doctor -> evaluate -> predict ->
    serve -> export, on a clean folder, with the CLI a user runs."""
    ref = f"{builder}:build_model"
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        fidelity: {{model: "{ref}", epochs: 1, train_fraction: 1.0}}
        params:
          lr: {{type: float, low: 0.5, high: 4.0, log: true}}
          model_args.units: {{type: int, low: 8, high: 32}}
          model_args.dropout: {{type: float, low: 0.0, high: 0.4}}
        fixed: {{batch_size: 32}}
    """))
    common = ["--data", str(learnable), "--val-size", "40"]
    r = run_cli("tune", "--space", str(space), "--study-dir", str(tmp_path / "study"),
                "--trials", "3", "--target-epochs", "2", "--top-k", "1", "-q", *common,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("tune", "show", str(tmp_path / "study"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model_args.units" in r.stdout
    r = run_cli("train", "--from-study", str(tmp_path / "study"), "--name", "best", "-q",
                "--data", str(learnable), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "best"
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == ref and set(config["model_args"]) == {"units", "dropout"}

    r = run_cli("doctor", "--model", ref, "--model-arg", "units=16", "--model-arg", "dropout=0.2",
                "--epochs", "1",
                *common, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "checks run: 0 error(s), 0 warning(s)" in r.stdout, r.stdout  # a healthy model
    assert "frozen-layer" not in r.stdout  # BatchNormalization's moving statistics are not
    assert "log-softmax-before-ce" not in r.stdout  # the bridge's own log-probabilities

    r = run_cli("evaluate", str(run), "--data", str(learnable), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(summary["test_acc"])

    image = _png(tmp_path / "x.png", 5)
    r = run_cli("predict", str(run), str(image), "--json", "--tta", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cli_probs = {t["class"]: t["probability"] for t in json.loads(r.stdout)["predictions"][0]["top"]}

    with serving(run, "--tta", "0", "--cache-size", "0") as url:
        body = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image.read_bytes())},
                          params={"top_k": 4}).json()
        served = {t["class"]: t["probability"] for t in body["predictions"][0]["top"]}
        assert httpx.get(f"{url}/").status_code == 200
        # KServe v2, with NVIDIA's client: the model's name is the builder's function
        import tritonclient.http as triton

        client = triton.InferenceServerClient(url.removeprefix("http://"))
        inp = triton.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([image.read_bytes()], dtype=np.object_))
        name = "build_model"
        assert client.is_model_ready(name)
        v2 = client.infer(name, [inp]).as_numpy("probabilities")[0]
        v2_classes = client.get_model_metadata(name)["parameters"]["classes"]
    for name, p in cli_probs.items():
        assert served[name] == pytest.approx(p, abs=1e-5)
        assert v2[v2_classes.index(name)] == pytest.approx(p, abs=1e-5)

    r = run_cli("export", str(run), "--format", "keras", "--out", str(tmp_path / "m.keras"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # plain Keras, in a process that imports nothing of cifarlab
    code = textwrap.dedent(f"""
        import json, os
        os.environ["KERAS_BACKEND"] = "torch"
        import numpy as np, keras
        from PIL import Image
        assert "cifarlab" not in __import__("sys").modules
        m = keras.saving.load_model({str(tmp_path / "m.keras")!r})
        x = np.asarray(Image.open({str(image)!r}).convert("RGB"), np.float32)[None]
        print(json.dumps(m.predict(x, verbose=0)[0].tolist()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(Path(CIFARLAB).parent / "python"), "-c", code], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    probs = json.loads(r.stdout)
    classes = json.loads((run / "summary.json").read_text())["classes"]
    for name, p in cli_probs.items():
        assert probs[classes.index(name)] == pytest.approx(p, abs=1e-5)

    # torch.onnx handles a Keras model too (through its torch.export-based exporter)
    import onnxruntime as ort

    r = run_cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.asarray(Image.open(image).convert("RGB"), np.float32).transpose(2, 0, 1)[None]
    onnx_probs = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    for name, p in cli_probs.items():
        assert onnx_probs[classes.index(name)] == pytest.approx(p, abs=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_predict(run_dir, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    r = run_cli("export", str(run_dir), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    image = _png(tmp_path / "x.png", 7)
    r = run_cli("predict", str(run_dir), str(image), "--json", "--tta", "0")
    top = json.loads(r.stdout)["predictions"][0]["top"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.asarray(Image.open(image).convert("RGB"), np.float32).transpose(2, 0, 1)[None]
    probs = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    classes = json.loads((run_dir / "summary.json").read_text())["classes"]
    for t in top:
        assert probs[classes.index(t["class"])] == pytest.approx(t["probability"], abs=1e-5)


def test_export_refuses_what_it_cannot_do(run_dir, capsys):
    code, _, err = call(capsys, "export", str(run_dir), "--format", "keras")
    assert code != 0 and "needs a Keras model" in err and "--format onnx" in err


@pytest.mark.parametrize("flag", ["cuda_graphs", "compile"])
def test_step_capture_and_compile_refuse_a_keras_model(learnable, flag):
    """A Keras model runs through cifarlab.kerasfast: cuda_graphs and compile, which capture
    or compile a PyTorch module's step, say so and name the setting to turn off."""
    cfg = _config("keras-cnn", learnable, filters=8, units=16).with_values({flag: True})
    with pytest.raises(ConfigError, match=f"{flag}: false"):
        train(cfg, progress=False)
