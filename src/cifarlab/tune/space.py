"""Search spaces: the default one, and user files in YAML or TOML.

A space file has three tables, all optional::

    fidelity:                  # how cheap each trial is
      model: airnet
      epochs: 2
      train_fraction: 0.25
    params:                    # what the sampler chooses; names are config keys or their leaf
      lr:            {type: float, low: 1.0, high: 40.0, log: true}
      batch_size:    {type: categorical, choices: [256, 512, 1024]}
      cutout:        {type: int, low: 0, high: 12, step: 4}
      ema:           {type: categorical, choices: [true, false]}
      ema_start_frac: {type: float, low: 0.1, high: 0.6, when: {ema: true}}
    fixed:                     # config values every trial shares
      aug.translate: 2

Every value is checked against :class:`~cifarlab.config.TrainConfig` before any training, and an
error names the file, the key and what is wrong with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.config import MODEL_ARGS, TrainConfig, config_paths, read_settings_file
from cifarlab.errors import ConfigError, ModelError
from cifarlab.models import default_config

__all__ = ["Fidelity", "Param", "SearchSpace", "default_space", "load_space"]

_KINDS = ("float", "int", "categorical")
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
# Config keys that are part of the fidelity, or that a study must not vary per trial.
_NOT_TUNABLE = {"data.source", "data.val_size", "data.seed", "data.test_fraction", "device",
                "data.skip_bad", "data.image_size", "eval_every", "tta"}


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its study name, the config key it sets, and its distribution."""

    name: str
    path: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # parent name -> values

    def describe(self) -> str:
        if self.kind == "categorical":
            text = "{" + ", ".join(map(str, self.choices)) + "}"
        else:
            text = f"[{self.low:g}, {self.high:g}]"
            if self.log:
                text += " log"
            if self.step is not None:
                text += f" step {self.step:g}"
        if self.when:
            text += "  when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return f"{self.name:<16} {self.kind:<11} {text}"


@dataclass(frozen=True)
class Fidelity:
    """How much training one trial gets: the tuner's cost knob."""

    model: str = "airnet"
    epochs: float = 2.0
    train_fraction: float = 0.25


@dataclass
class SearchSpace:
    params: list[Param]
    fidelity: Fidelity = field(default_factory=Fidelity)
    fixed: dict[str, Any] = field(default_factory=dict)

    def base_config(self, start: TrainConfig | None = None) -> TrainConfig:
        """The config every trial starts from: ``start`` (the study's baseline: the model's
        recipe unless the user gave a config), then the fidelity, then ``fixed``."""
        cfg = start if start is not None else default_config(self.fidelity.model)
        cfg = cfg.with_values({"optim.epochs": self.fidelity.epochs,
                               "data.train_fraction": self.fidelity.train_fraction,
                               "tta": 0, **self.fixed})
        return cfg

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask ``trial`` (an Optuna trial) for every active parameter; returns config values."""
        chosen: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for p in self.params:
            if any(chosen.get(parent, _MISSING) not in allowed
                   for parent, allowed in p.when.items()):
                continue  # a conditional parameter whose condition does not hold
            if p.kind == "float":
                v: Any = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "int":
                v = trial.suggest_int(p.name, int(p.low or 0), int(p.high or 0), log=p.log,
                                      step=int(p.step or 1))
            else:
                v = trial.suggest_categorical(p.name, list(p.choices))
            chosen[p.name] = v
            values[p.path] = v
        return values

    def config_for(self, params: dict[str, Any], start: TrainConfig | None = None) -> TrainConfig:
        """The config of a trial from its study parameters (names, not paths)."""
        by_name = {p.name: p.path for p in self.params}
        unknown = sorted(set(params) - set(by_name))
        if unknown:
            raise ConfigError(f"Parameters {unknown} are not in this study's search space.")
        return self.base_config(start).with_values({by_name[k]: v for k, v in params.items()})

    def to_dict(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for p in self.params:
            spec: dict[str, Any] = {"type": p.kind}
            if p.kind == "categorical":
                spec["choices"] = list(p.choices)
            else:
                spec.update(low=p.low, high=p.high)
                if p.log:
                    spec["log"] = True
                if p.step is not None:
                    spec["step"] = p.step
            if p.when:
                spec["when"] = {k: list(v) for k, v in p.when.items()}
            params[p.path if p.name == p.path else p.name] = spec
        return {"fidelity": asdict(self.fidelity), "params": params, "fixed": dict(self.fixed)}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "search space") -> SearchSpace:
        return _parse(raw, where)

    def describe(self) -> list[str]:
        f = self.fidelity
        lines = [f"fidelity: model={f.model} epochs={f.epochs:g} "
                 f"train_fraction={f.train_fraction:g}"]
        lines += ["  " + p.describe() for p in self.params]
        if self.fixed:
            lines.append("fixed: " + ", ".join(f"{k}={v}" for k, v in self.fixed.items()))
        return lines


class _Missing:
    pass


_MISSING = _Missing()


def default_space(model: str = "airnet", epochs: float = 2.0,
                  train_fraction: float = 0.25) -> SearchSpace:
    """The built-in space, centred on ``model``'s own recipe.

    Learning rate and weight decay span a factor of about 30 around the recipe on a log scale;
    the other ranges are wide enough to contain every setting the recipe's authors report.
    """
    base = default_config(model).optim
    raw = {
        "fidelity": {"model": model, "epochs": epochs, "train_fraction": train_fraction},
        "params": {
            "lr": {"type": "float", "low": _sig(base.lr / 8), "high": _sig(base.lr * 4),
                   "log": True},
            "weight_decay": {"type": "float", "low": _sig(base.weight_decay / 8),
                             "high": _sig(base.weight_decay * 4), "log": True},
            "momentum": {"type": "float", "low": 0.5, "high": 0.95},
            "label_smoothing": {"type": "float", "low": 0.0, "high": 0.4},
            "batch_size": {"type": "categorical", "choices": [256, 512, 1024]},
            "width": {"type": "float", "low": 0.5, "high": 1.5, "step": 0.25},
            "cutout": {"type": "int", "low": 0, "high": 12, "step": 4},
            "warmup_frac": {"type": "float", "low": 0.0, "high": 0.5},
        },
    }
    return _parse(raw, "default search space")


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def load_space(path: Path | str, *, model: str | None = None, epochs: float | None = None,
               train_fraction: float | None = None) -> SearchSpace:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) space file and check every key.

    ``model``, ``epochs`` and ``train_fraction`` override the file's fidelity when given.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Search space file {path} does not exist.")
    raw = read_settings_file(path, "search space file", (".yaml", ".yml", ".toml"))
    if isinstance(raw, dict):
        fid = dict(raw.get("fidelity") or {})
        for key, value in (("model", model), ("epochs", epochs),
                           ("train_fraction", train_fraction)):
            if value is not None:
                fid[key] = value
        raw = {**raw, "fidelity": fid}
    return _parse(raw, str(path))


def _parse(raw: Any, where: str) -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table with fidelity, params and fixed, "
                          f"got {type(raw).__name__}.")
    unknown = sorted(set(raw) - {"fidelity", "params", "fixed"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; valid keys "
                          "are fidelity, params, fixed.")
    fidelity = _parse_fidelity(raw.get("fidelity") or {}, where)
    try:
        base = default_config(fidelity.model)
    except ModelError as exc:
        raise ConfigError(f"{where}: fidelity.model: {exc}") from None

    fixed_raw = raw.get("fixed") or {}
    if not isinstance(fixed_raw, dict):
        raise ConfigError(f"{where}: fixed: expected a table of config keys, "
                          f"got {fixed_raw!r}.")
    paths = config_paths()
    fixed: dict[str, Any] = {}
    for key, value in fixed_raw.items():
        path = _resolve_key(str(key), paths, f"{where}: fixed.{key}")
        _check_value(base, path, value, f"{where}: fixed.{key}")
        fixed[path] = value

    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict):
        raise ConfigError(f"{where}: params: expected a table of parameters, "
                          f"got {params_raw!r}.")
    params: list[Param] = []
    for name, spec in params_raw.items():
        params.append(_parse_param(str(name), spec, base, paths, params, where))
    clash = sorted({p.path for p in params} & set(fixed))
    if clash:
        raise ConfigError(f"{where}: {', '.join(clash)} is both fixed and tuned; remove it "
                          "from one of the two tables.")
    return SearchSpace(params=params, fidelity=fidelity, fixed=fixed)


def _parse_fidelity(raw: Any, where: str) -> Fidelity:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: fidelity: expected a table, got {raw!r}.")
    unknown = sorted(set(raw) - {"model", "epochs", "train_fraction"})
    if unknown:
        raise ConfigError(f"{where}: fidelity: unknown key(s) {', '.join(unknown)}; valid keys "
                          "are model, epochs, train_fraction.")
    out = Fidelity(**raw)
    if not isinstance(out.model, str):
        raise ConfigError(f"{where}: fidelity.model: expected a model name, got {out.model!r}.")
    if not _is_number(out.epochs) or not out.epochs > 0:
        raise ConfigError(f"{where}: fidelity.epochs: expected a number > 0, "
                          f"got {out.epochs!r}.")
    if not _is_number(out.train_fraction) or not 0 < out.train_fraction <= 1:
        raise ConfigError(f"{where}: fidelity.train_fraction: expected a number in (0, 1], "
                          f"got {out.train_fraction!r}.")
    return Fidelity(out.model, float(out.epochs), float(out.train_fraction))


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _resolve_key(key: str, paths: dict[str, Any], where: str) -> str:
    """``optim.lr`` stays; ``lr`` becomes ``optim.lr`` when exactly one config key ends so;
    ``model_args.units`` is the model builder's keyword ``units``."""
    if key in paths:
        return key
    if key.startswith(MODEL_ARGS) and key[len(MODEL_ARGS):].isidentifier():
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    hint = f"did you mean one of {', '.join(matches)}?" if matches else (
        "valid keys are " + ", ".join(sorted(p.rsplit(".", 1)[-1] for p in paths)) + "."
    )
    raise ConfigError(f"{where}: {key!r} is not a config key; {hint}")


def _check_value(base: TrainConfig, path: str, value: Any, where: str) -> None:
    try:
        base.with_values({path: value}).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {value!r} is not a usable value: {exc}") from None


def _parse_param(name: str, spec: Any, base: TrainConfig, paths: dict[str, Any],
                 earlier: list[Param], where: str) -> Param:
    here = f"{where}: params.{name}"
    path = _resolve_key(name, paths, here)
    if path in _NOT_TUNABLE:
        raise ConfigError(f"{here}: {path} cannot vary between trials; set it with the "
                          "command's options or in the fixed table.")
    if any(p.path == path for p in earlier):
        raise ConfigError(f"{here}: {path} is listed twice.")
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: expected a table such as {{type: float, low: 0.1, "
                          f"high: 1.0}}, got {spec!r}.")
    unknown = sorted(set(spec) - _PARAM_KEYS)
    if unknown:
        raise ConfigError(f"{here}: unknown key(s) {', '.join(unknown)}; valid keys are "
                          f"{', '.join(sorted(_PARAM_KEYS))}.")
    kind = spec.get("type")
    if kind not in _KINDS:
        raise ConfigError(f"{here}.type: must be one of {', '.join(_KINDS)}, got {kind!r}.")
    default = paths[path] if path in paths else base.model_args.get(path[len(MODEL_ARGS):])
    when = _parse_when(spec.get("when"), earlier, here)

    if kind == "categorical":
        extra = sorted(set(spec) & {"low", "high", "log", "step"})
        if extra:
            raise ConfigError(f"{here}: {', '.join(extra)} do not apply to a categorical "
                              "parameter; list its values under choices.")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{here}.choices: expected a non-empty list, got {choices!r}.")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{here}.choices: values repeat in {choices!r}.")
        for c in choices:
            if not isinstance(c, bool | int | float | str) and c is not None:
                raise ConfigError(f"{here}.choices: {c!r} is not a number, string or boolean.")
            _check_value(base, path, c, f"{here}.choices")
        return Param(name, path, kind, choices=tuple(choices), when=when)

    if "choices" in spec:
        raise ConfigError(f"{here}: choices apply only to type categorical.")
    if isinstance(default, bool | str):
        raise ConfigError(f"{here}: {path} takes {type(default).__name__} values; use type "
                          "categorical with choices.")
    if kind == "float" and isinstance(default, int):
        raise ConfigError(f"{here}: {path} takes whole numbers; use type int.")
    for key in ("low", "high"):
        v: Any = spec.get(key)
        if not _is_number(v):
            raise ConfigError(f"{here}.{key}: expected a number, got {v!r}.")
        if kind == "int" and not float(v).is_integer():
            raise ConfigError(f"{here}.{key}: expected a whole number for type int, got {v!r}.")
    low, high = float(spec["low"]), float(spec["high"])
    if not low < high:
        raise ConfigError(f"{here}: low ({low}) must be below high ({high}).")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{here}.log: expected true or false, got {log!r}.")
    if log and low <= 0:
        raise ConfigError(f"{here}: a log scale needs low > 0, got low={low}.")
    step = spec.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise ConfigError(f"{here}.step: expected a number > 0, got {step!r}.")
        if log:
            raise ConfigError(f"{here}: log and step cannot be combined; drop one of them.")
        if kind == "int" and not float(step).is_integer():
            raise ConfigError(f"{here}.step: expected a whole number for type int, got {step!r}.")
    for key, v in (("low", low), ("high", high)):
        _check_value(base, path, int(v) if kind == "int" else float(v), f"{here}.{key}")
    cast = int if kind == "int" else float
    return Param(name, path, kind, low=cast(low), high=cast(high), log=log,
                 step=None if step is None else cast(step), when=when)


def _parse_when(raw: Any, earlier: list[Param], here: str) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{here}.when: expected a table such as {{ema: true}}, got {raw!r}.")
    out: dict[str, tuple[Any, ...]] = {}
    by_name = {p.name: p for p in earlier}
    for parent, values in raw.items():
        p = by_name.get(parent)
        if p is None:
            raise ConfigError(f"{here}.when: {parent!r} must be a parameter listed above this "
                              "one.")
        if p.kind != "categorical":
            raise ConfigError(f"{here}.when: {parent!r} must be categorical to be a condition.")
        allowed = tuple(values) if isinstance(values, list) else (values,)
        bad = [v for v in allowed if v not in p.choices]
        if bad:
            raise ConfigError(f"{here}.when: {bad!r} are not choices of {parent!r} "
                              f"({list(p.choices)}).")
        out[parent] = allowed
    return out
