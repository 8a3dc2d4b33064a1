"""Search spaces: the default space, YAML and TOML files, and every error naming its key."""

from __future__ import annotations

import optuna
import pytest

from cifarlab.errors import ConfigError
from cifarlab.tune.space import SearchSpace, default_space, load_space

YAML = """
fidelity:
  model: tutorial
  epochs: 3
  train_fraction: 0.5
params:
  lr: {type: float, low: 0.5, high: 8.0, log: true}
  optim.momentum: {type: float, low: 0.5, high: 0.95, step: 0.05}
  batch_size: {type: categorical, choices: [32, 64]}
  cutout: {type: int, low: 0, high: 8, step: 4}
  ema: {type: categorical, choices: [true, false]}
  ema_start_frac: {type: float, low: 0.1, high: 0.6, when: {ema: true}}
fixed:
  translate: 0
"""

TOML = """
[fidelity]
model = "tutorial"
epochs = 3

[params.lr]
type = "float"
low = 0.5
high = 8.0
log = true

[params.width]
type = "float"
low = 0.5
high = 1.0

[fixed]
"aug.flip" = false
"""


def test_default_space_covers_the_issue_parameters():
    space = default_space("airnet")
    assert [p.name for p in space.params] == [
        "lr", "weight_decay", "momentum", "label_smoothing", "batch_size", "width", "cutout",
        "warmup_frac"]
    lr = space.params[0]
    assert lr.log and lr.low < 11.5 < lr.high  # centred on airnet's own recipe
    base = space.base_config()
    assert base.optim.epochs == 2.0 and base.data.train_fraction == 0.25 and base.tta == 0


def test_yaml_file_with_conditional_parameter(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(YAML)
    space = load_space(f)
    assert space.fidelity.model == "tutorial" and space.fidelity.epochs == 3
    assert space.fixed == {"aug.translate": 0}
    cond = space.params[-1]
    assert cond.path == "optim.ema_start_frac" and cond.when == {"ema": (True,)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_with, seen_without = 0, 0
    for _ in range(20):
        trial = study.ask()
        values = space.suggest(trial)
        cfg = space.base_config().with_values(values)
        assert cfg.model == "tutorial" and cfg.aug.translate == 0
        assert 0.5 <= cfg.optim.lr <= 8.0 and cfg.optim.batch_size in (32, 64)
        if values["optim.ema"]:
            seen_with += 1
            assert "optim.ema_start_frac" in values
        else:
            seen_without += 1
            assert "optim.ema_start_frac" not in values
        study.tell(trial, 1.0)
    assert seen_with and seen_without
    # round trip through the dict stored in the study
    assert SearchSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text(TOML)
    space = load_space(f, epochs=1.5, train_fraction=0.1)
    assert space.fidelity.epochs == 1.5 and space.fidelity.train_fraction == 0.1
    assert space.base_config().aug.flip is False
    assert [p.path for p in space.params] == ["optim.lr", "width"]


BAD = [
    ("params: {lr: {type: float, low: 1.0}}", "params.lr.high: expected a number"),
    ("params: {lr: {type: float, low: 2.0, high: 1.0}}", "low (2.0) must be below high"),
    ("params: {lr: {type: float, low: 0.0, high: 1.0, log: true}}", "log scale needs low > 0"),
    ("params: {lr: {type: floaty, low: 1, high: 2}}", "params.lr.type: must be one of"),
    ("params: {lr: {type: float, low: 1, high: 2, stepp: 1}}", "unknown key(s) stepp"),
    ("params: {lrr: {type: float, low: 1, high: 2}}", "'lrr' is not a config key"),
    ("params: {momentum: {type: float, low: 0.5, high: 1.2}}", "params.momentum.high: 1.2"),
    ("params: {batch_size: {type: float, low: 32, high: 64}}", "takes whole numbers"),
    ("params: {cutout: {type: int, low: 0, high: 8, step: 1.5}}", "params.cutout.step"),
    ("params: {batch_size: {type: categorical, choices: []}}", "non-empty list"),
    ("params: {batch_size: {type: categorical, choices: [32, '64']}}", "expected int"),
    ("params: {flip: {type: int, low: 0, high: 1}}", "use type categorical"),
    ("params: {ema_start_frac: {type: float, low: 0.1, high: 0.5, when: {ema: true}}}",
     "'ema' must be a parameter listed above"),
    ("params: {tta: {type: int, low: 0, high: 2}}", "cannot vary between trials"),
    ("fidelity: {epochs: 0}", "fidelity.epochs"),
    ("fidelity: {model: vgg}", "Unknown model 'vgg'"),
    ("fidelity: {epoch: 2}", "fidelity: unknown key(s) epoch"),
    ("fixed: {lr: 1.0}\nparams: {lr: {type: float, low: 1, high: 2}}", "both fixed and tuned"),
    ("fixed: {momentum: 2.0}", "fixed.momentum: 2.0 is not a usable value"),
    ("paramz: {}", "unknown top-level key(s) paramz"),
    ("params: [1, 2]", "params: expected a table"),
    ("params: {lr: {type: float, low: 1\n", "cannot parse"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_space_errors_name_the_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_space(f)
    assert message in str(exc.value)
    assert str(f) in str(exc.value)


def test_unknown_file_type_and_missing_file(tmp_path):
    f = tmp_path / "space.json"
    f.write_text("{}")
    with pytest.raises(ConfigError, match=r"use \.yaml, \.yml or \.toml"):
        load_space(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
