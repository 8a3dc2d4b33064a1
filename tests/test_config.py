"""The typed config: strict parsing, dotted and short keys, recipes, files, validation."""

from __future__ import annotations

import json

import pytest

from cifarlab.config import (
    TrainConfig,
    config_paths,
    default_val_size,
    load_config_file,
    resolve_key,
)
from cifarlab.errors import ConfigError
from cifarlab.models import default_config, get_spec, list_models


def test_round_trip_through_json_is_exact():
    cfg = default_config("resnet18").with_values({"lr": 3.0, "aug.cutout": 8, "seed": 7})
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.optim.lr == 3.0 and again.aug.cutout == 8


def test_short_keys_resolve_to_one_field_and_top_level_wins():
    assert resolve_key("lr") == "optim.lr"
    assert resolve_key("val_size") == "data.val_size"
    assert resolve_key("optim.lr") == "optim.lr"
    assert resolve_key("seed") == "seed"  # not data.seed
    with pytest.raises(ConfigError, match="Unknown config key 'lrr'"):
        resolve_key("lrr")


def test_with_values_type_checks_each_field():
    cfg = TrainConfig().with_values({"epochs": 3, "flip": False})
    assert cfg.optim.epochs == 3.0 and isinstance(cfg.optim.epochs, float)
    assert cfg.aug.flip is False
    with pytest.raises(ConfigError, match="config.optim.batch_size: expected int"):
        TrainConfig().with_values({"batch_size": 1.5})
    with pytest.raises(ConfigError, match="config.aug.flip: expected bool"):
        TrainConfig().with_values({"flip": "yes"})


@pytest.mark.parametrize("name", list_models())
def test_every_recipe_goes_through_the_checked_path(name):
    cfg = default_config(name)
    for key, value in get_spec(name).recipe.items():
        assert getattr(cfg.optim, key) == value
    cfg.validate()


def test_a_typo_in_a_recipe_is_an_error_not_a_new_attribute():
    with pytest.raises(ConfigError, match="'optim.momentumm'"):
        TrainConfig().with_recipe({"momentumm": 0.9})


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_validate_checks_the_device(device):
    with pytest.raises(ConfigError, match="is not a device; use auto, cpu, cuda or cuda:N"):
        TrainConfig(device=device).validate()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_valid_devices_pass_validation(device):
    TrainConfig(device=device).validate()


@pytest.mark.parametrize(("values", "message"), [
    ({"compile": True, "compile_mode": "fast"}, "compile_mode must be one of default"),
    ({"compile_mode": "max-autotune-no-cudagraphs"}, "needs compile: true"),
    ({"compile": True, "cuda_graphs": True, "compile_mode": "reduce-overhead"},
     "use max-autotune-no-cudagraphs"),
    ({"optim": {"muon_ns_precision": "fp16"}}, "muon_ns_precision must be fp32 or bf16"),
])
def test_compile_mode_and_ns_precision_are_checked(values, message):
    raw = TrainConfig().to_dict()
    for key, value in values.items():
        raw[key] = raw[key] | value if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(raw).validate()


def test_max_autotune_without_graphs_combines_with_cuda_graphs():
    TrainConfig(compile=True, cuda_graphs=True,
                compile_mode="max-autotune-no-cudagraphs").validate()


def test_validation_split_scales_with_the_dataset():
    assert default_val_size(50_000) == 5000
    assert default_val_size(45_000) == 4500
    assert default_val_size(800) == 80
    assert default_val_size(9) == 0
    assert TrainConfig().data.val_size is None
    with pytest.raises(ConfigError, match="data.val_size must be >= 0"):
        TrainConfig().with_values({"val_size": -1}).validate()


def test_config_file_errors_name_the_file(tmp_path):
    good = tmp_path / "config.json"
    good.write_text(default_config("tutorial").to_json())
    assert load_config_file(good) == default_config("tutorial")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON"):
        load_config_file(bad)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"optim": {"lrr": 1}}))
    with pytest.raises(ConfigError, match=r"typo.json: config.optim: unknown key\(s\) lrr"):
        load_config_file(typo)
    with pytest.raises(ConfigError, match="missing.json: the config file does not exist"):
        load_config_file(tmp_path / "missing.json")
    (tmp_path / "config.ini").write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"config.ini: not valid JSON .*; a config file is read "
                                          r"as YAML when its name ends in .yaml or .yml"):
        load_config_file(tmp_path / "config.ini")
    noext = tmp_path / "config"
    noext.write_text(default_config("tutorial").to_json())
    assert load_config_file(noext) == default_config("tutorial")


def test_config_file_in_yaml_or_toml(tmp_path):
    """A hand-written config may be YAML or TOML, like a search space file, with the same checks."""
    want = TrainConfig().with_values({"optim.lr": 0.5, "optim.epochs": 3.0})
    yml = tmp_path / "c.yaml"
    yml.write_text("optim:\n  lr: 0.5\n  epochs: 3\n")
    assert load_config_file(yml) == want
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlr = 0.5\nepochs = 3\n")
    assert load_config_file(toml) == want
    broken = tmp_path / "broken.yml"
    broken.write_text("optim: [\n")
    with pytest.raises(ConfigError, match="broken.yml: cannot parse the config file"):
        load_config_file(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text("[optim]\nlrr = 1\n")
    with pytest.raises(ConfigError, match=r"typo.toml: config.optim: unknown key\(s\) lrr"):
        load_config_file(typo)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config_file(tmp_path / "list.yaml")


def test_every_leaf_is_settable():
    paths = config_paths()
    assert {"optim.lr", "data.val_size", "aug.flip", "deterministic", "tta"} <= set(paths)
    for path, default in paths.items():
        if default is not None:
            assert TrainConfig().with_values({path: default}) == TrainConfig()
