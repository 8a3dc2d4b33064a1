"""What a study tells its user: the live table of finished trials, the summary, and the best
configuration to retrain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cifarlab.config import TrainConfig
from cifarlab.errors import StudyError
from cifarlab.tune.storage import open_study, study_space

__all__ = ["LiveTable", "Summary", "best_config", "retrain_config", "summarize"]


class LiveTable:
    """One fixed-width row per finished trial, printed by the worker that ran it."""

    def __init__(self, prefix: str = "", quiet: bool = False,
                 write: Callable[[str], None] | None = None):
        self.prefix, self.quiet = prefix, quiet
        self.write = write or (lambda s: print(s, flush=True))

    def header(self) -> None:
        if not self.quiet:
            self.write(f"{self.prefix}{'trial':>5} {'state':<9} {'val_loss':>9} {'val_acc':>8} "
                       f"{'epochs':>6} {'seconds':>8} {'best':>9}  params")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.quiet:
            return
        value = "" if trial.value is None else f"{trial.value:.4f}"
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = f"({trial.intermediate_values[max(trial.intermediate_values)]:.4f})"
        acc = trial.user_attrs.get("val_acc")
        try:
            best = f"{study.best_value:.4f}"
        except ValueError:
            best = "-"
        seconds = (trial.duration.total_seconds() if trial.duration else 0.0)
        params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        line = (f"{self.prefix}{trial.number:>5} {trial.state.name.lower():<9} {value:>9} "
                f"{'' if acc is None else f'{acc:.4f}':>8} "
                f"{trial.user_attrs.get('epochs', ''):>6} {seconds:>8.1f} {best:>9}  {params}")
        if trial.state == TrialState.FAIL:
            line += f"  [{trial.user_attrs.get('fail_reason', 'failed')}]"
        self.write(line)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass
class Summary:
    study_name: str
    n_complete: int
    n_pruned: int
    n_failed: int
    n_running: int
    best_number: int | None
    best_value: float | None
    best_val_acc: float | None
    best_params: dict[str, Any]
    fail_reasons: dict[str, int]

    def lines(self) -> list[str]:
        out = [f"study {self.study_name}: {self.n_complete} complete, {self.n_pruned} pruned, "
               f"{self.n_failed} failed" + (f", {self.n_running} running"
                                            if self.n_running else "")]
        if self.best_number is None:
            out.append("no trial completed")
        else:
            acc = "" if self.best_val_acc is None else f", val_acc {self.best_val_acc:.4f}"
            out.append(f"best trial {self.best_number}: val_loss {self.best_value:.4f}{acc}")
            out += [f"  {k} = {_fmt(v)}" for k, v in self.best_params.items()]
        for reason, n in sorted(self.fail_reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"failed x{n}: {reason}")
        return out


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    reasons: dict[str, int] = {}
    for t in by_state[TrialState.FAIL]:
        r = str(t.user_attrs.get("fail_reason", "worker stopped (no heartbeat) or crashed"))
        reasons[r] = reasons.get(r, 0) + 1
    best = _best_trial(study)
    return Summary(
        study_name=study.study_name,
        n_complete=len(by_state[TrialState.COMPLETE]), n_pruned=len(by_state[TrialState.PRUNED]),
        n_failed=len(by_state[TrialState.FAIL]), n_running=len(by_state[TrialState.RUNNING]),
        best_number=None if best is None else best.number,
        best_value=None if best is None else best.value,
        best_val_acc=None if best is None else best.user_attrs.get("val_acc"),
        best_params={} if best is None else dict(best.params), fail_reasons=reasons)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def best_config(study_dir: Path, storage: str | None = None) -> tuple[TrainConfig, FrozenTrial]:
    """The best trial's full config, for retraining (``cifarlab train --from-study``)."""
    study = open_study(study_dir, storage)
    best = _best_trial(study)
    if best is None:
        raise StudyError(f"Study {study.study_name!r} has no completed trial yet.")
    return study_space(study).config_for(best.params), best


def retrain_config(study_dir: Path, storage: str | None = None,
                   epochs: float | None = None) -> tuple[TrainConfig, FrozenTrial]:
    """The configuration ``cifarlab train --from-study`` trains: the best trial's, on every
    training image (train + validation, at the full fraction), with the default test-time
    augmentation, for the study's fidelity epochs unless ``epochs`` is given."""
    cfg, best = best_config(study_dir, storage)
    values: dict[str, object] = {"data.val_size": 0, "data.train_fraction": 1.0,
                                 "tta": TrainConfig().tta}
    if epochs is not None:
        values["optim.epochs"] = float(epochs)
    return cfg.with_values(values), best
