"""The one configuration format: typed dataclasses, stored in every run as ``asdict(config)``.

Optimizer hyperparameters use airbench's *decoupled* form, so that each can be tuned on its own:
``lr`` is the step size per 1024 examples independent of momentum, and ``weight_decay`` is the
decay per 1024 examples independent of ``lr``. See :func:`cifarlab.train.build_optimizer`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.errors import ConfigError

__all__ = [
    "AugConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "config_paths",
    "default_val_size",
    "flatten",
    "load_config_file",
    "resolve_key",
]

# What `device` accepts (checked here, before anything runs; availability is checked when the
# device is resolved).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    source: str | None = None  # None: --data, then $CIFARLAB_DATA, then the user cache
    image_size: int = 32
    # taken from train, stratified; None: 10% of the training split, at most 5000 (see
    # default_val_size); 0 trains on every training image
    val_size: int | None = None
    train_fraction: float = 1.0  # stratified subsample of train (a tuning fidelity)
    test_fraction: float = 0.2  # for image trees that ship no test split
    skip_bad: bool = False
    seed: int = 0  # seeds the validation, test and subsample splits


@dataclass
class OptimConfig:
    epochs: float = 9.9
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples, decoupled from momentum
    momentum: float = 0.85  # Nesterov
    weight_decay: float = 0.0153  # per 1024 examples, decoupled from lr
    bias_scaler: float = 64.0  # lr multiplier (not wd) for BatchNorm biases
    label_smoothing: float = 0.2
    warmup_frac: float = 0.23  # fraction of steps to reach the peak lr (triangular schedule)
    lr_start: float = 0.2  # schedule factor at step 0
    lr_end: float = 0.07  # schedule factor at the last step
    ema: bool = True  # lookahead-style weight averaging in the last part of training
    ema_start_frac: float = 0.3
    # sgd: Nesterov SGD for every parameter; muon: Muon (orthogonalized momentum) for the
    # convolution filter banks and SGD as above for the head and the biases
    optimizer: str = "sgd"
    muon_lr: float = 0.24  # per step: an orthogonalized update has a fixed size
    muon_momentum: float = 0.6  # Nesterov
    # the arithmetic of Muon's Newton–Schulz iteration: fp32, or bf16 as airbench94_muon does
    # (cheaper on a GPU; the iteration only needs singular values near 1, not exact ones)
    muon_ns_precision: str = "fp32"


@dataclass
class AugConfig:
    flip: bool = True  # alternating flip: each image is mirrored on every other epoch
    translate: int = 2  # random crop from a reflect-padded image, in pixels
    cutout: int = 0  # side of a zeroed square, 0 = off


@dataclass
class TrainConfig:
    # a registered name (`cifarlab models`), a .keras file, or a builder: FILE.py:function or
    # package.module:function, called with input_shape, num_classes and model_args
    model: str = "airnet"
    width: float = 1.0
    # keyword arguments of the model's builder (units, layers, dropout...): tunable as
    # model_args.<name>
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    precision: str = "auto"  # auto | bf16 | fp32; auto = bf16 where the hardware has bf16 units
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # cuDNN's deterministic kernels (a CUDA run repeats bit for bit) or its autotuned fastest
    # ones; no effect on the CPU, which is deterministic either way
    deterministic: bool = True
    # torch.compile the model (PyTorch models only): fewer, fused kernels per step, for a
    # compile of tens of seconds at the start of the run (and again for evaluation shapes)
    compile: bool = False
    # torch.compile's mode: default, max-autotune-no-cudagraphs (times Triton's kernels against
    # cuDNN's for each layer shape: minutes of compiling), or, without cuda_graphs: true,
    # reduce-overhead and max-autotune (which capture graphs of their own)
    compile_mode: str = "default"
    # capture the training step as a CUDA graph and replay it (CUDA only; a no-op elsewhere):
    # one launch per step instead of hundreds, for small nets whose eager steps are bound by
    # the CPU's dispatching (cifarlab.step). PyTorch models; with compile: true the graph
    # replays the compiled kernels.
    cuda_graphs: bool = False
    tta: int = 2  # test-time augmentation: 0 none, 1 mirror, 2 mirror + 1px translations
    seed: int = 0
    eval_every: int = 1  # evaluate on the validation split every N epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_recipe(self, recipe: dict[str, Any]) -> TrainConfig:
        """A copy with a model's recipe (optimizer keys: ``{"lr": 2.2, ...}``) applied through
        the same checked path as any other value: a typo in a recipe is an error, not a new
        attribute. :func:`cifarlab.models.default_config` applies a registered model's."""
        return self.with_values({f"optim.{k}": v for k, v in recipe.items()})

    def get(self, path: str) -> Any:
        """The value at a dotted path such as ``optim.lr``."""
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def with_values(self, values: dict[str, Any]) -> TrainConfig:
        """A copy with values set by dotted path (``{"optim.lr": 2.0}``) or by a leaf name that
        names one field (``{"lr": 2.0}``), type-checked per field."""
        raw = self.to_dict()
        for key, value in values.items():
            path = resolve_key(key)
            *parents, leaf = path.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
        return TrainConfig.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build a config from a plain dict, naming any unknown or mistyped key."""
        return _from_dict(cls, raw, "config")

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first value that cannot work."""
        checks: list[tuple[bool, str]] = [
            (self.optim.epochs > 0, "optim.epochs must be > 0"),
            (self.optim.batch_size >= 1, "optim.batch_size must be >= 1"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (0 <= self.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.optim.optimizer in ("sgd", "muon"), "optim.optimizer must be sgd or muon"),
            (self.optim.muon_lr > 0, "optim.muon_lr must be > 0"),
            (0 <= self.optim.muon_momentum < 1, "optim.muon_momentum must be in [0, 1)"),
            (self.optim.muon_ns_precision in ("fp32", "bf16"),
             "optim.muon_ns_precision must be fp32 or bf16"),
            (0 <= self.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)"),
            (0 <= self.optim.warmup_frac < 1, "optim.warmup_frac must be in [0, 1)"),
            (self.width > 0, "width must be > 0"),
            (self.data.image_size >= 8, "data.image_size must be >= 8"),
            (self.data.val_size is None or (isinstance(self.data.val_size, int)
             and not isinstance(self.data.val_size, bool) and self.data.val_size >= 0),
             "data.val_size must be >= 0 (0 trains on every training image)"),
            (0 < self.data.train_fraction <= 1, "data.train_fraction must be in (0, 1]"),
            (0 < self.data.test_fraction < 1, "data.test_fraction must be in (0, 1)"),
            (self.aug.translate >= 0, "aug.translate must be >= 0"),
            (self.aug.cutout >= 0, "aug.cutout must be >= 0"),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
            (self.compile_mode in COMPILE_MODES,
             f"compile_mode must be one of {', '.join(COMPILE_MODES)}"),
            (self.compile or self.compile_mode == "default",
             f"compile_mode {self.compile_mode} needs compile: true"),
            (not (self.cuda_graphs and self.compile_mode in ("reduce-overhead", "max-autotune")),
             f"compile_mode {self.compile_mode} captures CUDA graphs of its own, which "
             "cuda_graphs: true does for the whole step; use max-autotune-no-cudagraphs"),
            (self.tta in (0, 1, 2), "tta must be 0, 1 or 2"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (bool(DEVICE_PATTERN.fullmatch(self.device)),
             f"device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid configuration: {message}.")
        for key, value in self.model_args.items():
            if not (isinstance(key, str) and key.isidentifier()):
                raise ConfigError(f"Invalid configuration: model_args key {key!r} is not a "
                                  "Python identifier (the builder's keyword argument).")
            if not _is_plain(value):
                raise ConfigError(f"Invalid configuration: model_args.{key} = {value!r}; "
                                  "use numbers, strings, booleans, null or lists of them.")
        return self


def _from_dict(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(fields)}."
        )
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if value is None or default is None:
        if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected a number or null, got {value!r}.")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}.")


def _is_plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | str) or (
        isinstance(value, float) and math.isfinite(value))


MODEL_ARGS = "model_args."


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (``TrainConfig.to_dict()``) as dotted keys: ``{"optim.lr": ...}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_paths() -> dict[str, Any]:
    """Every settable leaf of :class:`TrainConfig` as ``{"optim.lr": default, ...}``."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(TrainConfig(), "")
    return out


def resolve_key(key: str) -> str:
    """The dotted path of a config key: ``optim.lr`` as given, or ``lr`` when one field has that
    name (a top-level field wins: ``seed`` is the training seed, ``data.seed`` the split seed)."""
    paths = config_paths()
    if key in paths:
        return key
    if key.startswith(MODEL_ARGS) and key[len(MODEL_ARGS):].isidentifier():
        return key  # a builder keyword: the builder says whether it takes it
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"Unknown config key {key!r}; valid keys are {', '.join(sorted(paths))}.")


def default_val_size(n_train: int) -> int:
    """10% of the training split, at most 5,000 (CIFAR-10's 50,000 -> 5,000; a folder of 800
    training images -> 80), and at least one image per class is left to the caller's check."""
    return min(5000, n_train // 10)


def read_settings_file(path: Path | str, what: str,
                       suffixes: tuple[str, ...] = (".json", ".yaml", ".yml", ".toml"),
                       other_as_json: bool = False) -> Any:
    """The parsed contents of a JSON, YAML (safe loader) or TOML file, chosen by its suffix;
    ``what`` names the file's role in the errors ("config file", "search space file"). A suffix
    outside ``suffixes`` is refused, or with ``other_as_json`` read as JSON (a config saved
    without its suffix). An empty YAML file is an empty mapping."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in suffixes and other_as_json:
        suffix = ".json"
    elif suffix not in suffixes:
        raise ConfigError(f"{path}: unknown {what} type {suffix!r}; use "
                          + ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: the {what} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the {what} is not UTF-8 text ({exc}).") from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
            return {} if raw is None else raw
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); a {what} is read as YAML when "
                          "its name ends in .yaml or .yml, as TOML when it ends in .toml, else "
                          "as JSON.") from None
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError carry line numbers
        raise ConfigError(f"{path}: cannot parse the {what}: {exc}") from None


def load_config_file(path: Path | str) -> TrainConfig:
    """A training config: a run folder's ``config.json``, or a file written by hand in JSON, YAML
    or TOML, checked key by key; every error names the file."""
    path = Path(path)
    raw = read_settings_file(path, "config file", other_as_json=True)
    try:
        return TrainConfig.from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
