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
from cifarlab.tune.metric import study_metric
from cifarlab.tune.objective import REPEAT_ATTR
from cifarlab.tune.storage import open_study, study_space
from cifarlab.tune.target import PICKED_BY, Target, answer, target_config

__all__ = ["LiveTable", "Retrain", "Summary", "best_config", "retrain_config", "summarize"]


class LiveTable:
    """One fixed-width row per finished trial, printed by the worker that ran it."""

    def __init__(self, prefix: str = "", quiet: bool = False,
                 write: Callable[[str], None] | None = None, target: Target | None = None,
                 column: str = "val_loss"):
        self.prefix, self.quiet, self.target, self.column = prefix, quiet, target, column
        self.write = write or (lambda s: print(s, flush=True))

    def header(self) -> None:
        if not self.quiet:
            self.write(f"{self.prefix}{'trial':>5} {'state':<9} {self.column:>9} {'val_acc':>8} "
                       f"{'epochs':>6} {'seconds':>8} {'best':>9}  params")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.quiet:
            return
        value = "" if trial.value is None else f"{trial.value:.4f}"
        if trial.state in (TrialState.PRUNED, TrialState.WAITING) and trial.intermediate_values:
            value = f"({trial.intermediate_values[max(trial.intermediate_values)]:.4f})"
        state = trial.state.name.lower()
        epochs = trial.user_attrs.get("epochs", "")
        ft = trial.user_attrs.get("ft")  # a freeze-thaw trial: one row per move
        if isinstance(ft, dict):
            state = "paused" if trial.state == TrialState.WAITING else state
            epochs = f"{100 * ft.get('budget', 0):.0f}%"  # of the target budget, so far
        acc = trial.user_attrs.get("val_acc")
        try:
            best = f"{study.best_value:.4f}"
        except ValueError:
            best = "-"
        seconds = (trial.duration.total_seconds() if trial.duration else 0.0)
        if isinstance(ft, dict):
            seconds = sum(m[1] for m in ft.get("moves", []))
        params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        number = str(trial.number)
        if self.target is not None:  # a trial of the target study
            role = trial.user_attrs.get("role")
            if role is None or trial.user_attrs.get("duplicate"):
                return  # taken by another worker first, or a duplicate: it did nothing
            number = "B" if role == "baseline" else f"T{trial.number}"
            why = trial.user_attrs.get(PICKED_BY)
            params = (f"[{'baseline' if role == 'baseline' else 'trial ' + str(trial.user_attrs.get('source_trial'))}"
                      f"{f' ({why})' if why else ''}"
                      f" at the target budget: {self.target.epochs:g} epochs, all training images]")
            best = ""
        line = (f"{self.prefix}{number:>5} {state:<9} {value:>9} "
                f"{'' if acc is None else f'{acc:.4f}':>8} "
                f"{epochs:>6} {seconds:>8.1f} {best:>9}  {params}")
        if trial.state == TrialState.FAIL:
            line += f"  [{trial.user_attrs.get('fail_reason', 'failed')}]"
        if trial.user_attrs.get(REPEAT_ATTR) is not None:
            line += f"  [the parameters of trial {trial.user_attrs[REPEAT_ATTR]}: its result]"
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
    target_epochs: float | None = None
    baseline_value: float | None = None  # validation loss at the target budget
    baseline_val_acc: float | None = None
    answer: str | None = None  # "baseline", "trial N", or None before the target trials ran
    answer_value: float | None = None
    answer_val_acc: float | None = None
    answer_params: dict[str, Any] | None = None
    target_rows: list[dict[str, Any]] | None = None  # every completed target trial, best first
    metric: str = "val_loss"  # the column name of what the study minimises
    metric_describe: str = "validation cross-entropy"
    n_paused: int = 0  # freeze-thaw trials waiting to be continued

    def lines(self) -> list[str]:
        out = [f"study {self.study_name}: {self.n_complete} complete, {self.n_pruned} pruned, "
               f"{self.n_failed} failed" + (f", {self.n_running} running"
                                            if self.n_running else "")
               + (f", {self.n_paused} paused (a later run with more --trials may continue them)"
                  if self.n_paused else "")]
        if self.best_number is None:
            out.append("no trial completed")
        else:
            acc = "" if self.best_val_acc is None else f", val_acc {self.best_val_acc:.4f}"
            out.append(f"best trial {self.best_number}: {self.metric} {self.best_value:.4f}{acc}")
            out += [f"  {k} = {_fmt(v)}" for k, v in self.best_params.items()]
        for reason, n in sorted(self.fail_reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"failed x{n}: {reason}")
        out += self.target_lines()
        return out

    def target_lines(self) -> list[str]:
        """Baseline and search winners side by side at the target budget, and the answer."""
        if self.target_epochs is None:
            return []
        out = [f"at the target budget ({self.target_epochs:g} epochs on all training images), "
               f"{self.metric} ({self.metric_describe}):"]
        for row in self.target_rows or []:
            acc = "" if row["val_acc"] is None else f"  val_acc {row['val_acc']:.4f}"
            mark = "  <- answer" if row["name"] == self.answer else ""
            why = f"  ({row['picked_by']})" if row.get("picked_by") else ""
            out.append(f"  {row['name']:<10} {row['value']:.4f}{acc}{mark}{why}")
        if self.answer is None:
            out.append("answer: not yet; the baseline and the search's best have not all "
                       "been trained at the target budget (run the study again to finish)")
        elif self.answer == "baseline":
            if len(self.target_rows or []) > 1:
                out.append("answer: the baseline. No configuration found by the search beat it "
                           "at the target budget, so tuning did not pay off here; train the "
                           "baseline.")
            else:
                out.append("answer: the baseline (no search winner evaluated at the target "
                           "budget yet)")
        else:
            assert self.answer_value is not None
            gain = ("" if self.baseline_value is None else
                    f", {self.baseline_value - self.answer_value:.4f} below the baseline's "
                    f"{self.baseline_value:.4f}")
            out.append(f"answer: {self.answer} ({self.metric} {self.answer_value:.4f}{gain})")
            out += [f"  {k} = {_fmt(v)}" for k, v in (self.answer_params or {}).items()]
        return out


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    reasons: dict[str, int] = {}
    for t in by_state[TrialState.FAIL]:
        r = str(t.user_attrs.get("fail_reason", "worker stopped (no heartbeat) or crashed"))
        reasons[r] = reasons.get(r, 0) + 1
    best = _best_trial(study)
    metric = study_metric(study)
    out = Summary(
        study_name=study.study_name,
        n_complete=len(by_state[TrialState.COMPLETE]), n_pruned=len(by_state[TrialState.PRUNED]),
        n_failed=len(by_state[TrialState.FAIL]), n_running=len(by_state[TrialState.RUNNING]),
        best_number=None if best is None else best.number,
        best_value=None if best is None else best.value,
        best_val_acc=None if best is None else best.user_attrs.get("val_acc"),
        best_params={} if best is None else dict(best.params), fail_reasons=reasons,
        metric=metric.column, metric_describe=metric.describe,
        n_paused=sum(1 for t in by_state[TrialState.WAITING] if "ft" in t.user_attrs))
    ans = answer(study)
    if ans.target is None:
        return out
    out.target_epochs = ans.target.epochs
    out.target_rows = [{"name": _target_label(t), "value": t.value,
                        "val_acc": t.user_attrs.get("val_acc"),
                        "source_trial": t.user_attrs.get("source_trial"),
                        "picked_by": t.user_attrs.get(PICKED_BY)}
                       for t in ans.evaluated]
    if ans.baseline is None or ans.best is None:
        return out  # nothing is an answer before the baseline has been measured
    out.baseline_value = ans.baseline.value
    out.baseline_val_acc = ans.baseline.user_attrs.get("val_acc")
    out.answer = _target_label(ans.best)
    out.answer_value = ans.best.value
    out.answer_val_acc = ans.best.user_attrs.get("val_acc")
    if ans.source_trial is not None:
        out.answer_params = dict(study.get_trials(deepcopy=False)[ans.source_trial].params)
    return out


def _target_label(t: FrozenTrial) -> str:
    if t.user_attrs.get("role") == "baseline":
        return "baseline"
    return f"trial {t.user_attrs.get('source_trial')}"


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


@dataclass
class Retrain:
    """What ``cifarlab train --from-study`` trains, and why."""

    config: TrainConfig
    what: str  # "baseline", "trial N"
    reason: str  # one line for the user


def retrain_config(study_dir: Path, storage: str | None = None, epochs: float | None = None,
                   baseline: bool = False) -> Retrain:
    """The configuration ``cifarlab train --from-study`` trains: the study's answer at its
    target budget (a search winner only if it beat the baseline there, else the baseline), or
    the baseline when ``baseline``; on every training image (train + validation), with the
    default test-time augmentation, for the target epochs unless ``epochs`` is given.

    A study made before target budgets existed answers with its best search trial at the
    study's fidelity epochs, as it did then."""
    study = open_study(study_dir, storage)
    ans = answer(study)
    column = study_metric(study).column
    if ans.target is None:
        cfg, best = best_config(study_dir, storage)
        out = Retrain(cfg, f"trial {best.number}",
                      f"the best search trial ({column} {best.value:.4f}); this study has no "
                      "target budget")
    elif baseline:
        out = Retrain(target_config(study, "baseline", None), "baseline",
                      "the baseline, as asked (--baseline)")
    elif ans.baseline is None or ans.best is None:
        raise StudyError(
            f"Study {study.study_name!r} has not yet measured its baseline at the target budget "
            f"({ans.target.epochs:g} epochs), so it cannot say whether any configuration beats "
            "it. Run the same `cifarlab tune` command again to finish the study, or pass "
            "--baseline to train the baseline.")
    elif ans.is_baseline:
        assert ans.baseline.value is not None
        out = Retrain(target_config(study, "baseline", None), "baseline",
                      f"the baseline: no configuration of the search beat its {column} "
                      f"({ans.baseline.value:.4f}) at the target budget")
    else:
        assert ans.best.value is not None and ans.baseline.value is not None
        out = Retrain(target_config(study, "candidate", ans.source_trial),
                      f"trial {ans.source_trial}",
                      f"trial {ans.source_trial}: {column} {ans.best.value:.4f} at the target "
                      f"budget against the baseline's {ans.baseline.value:.4f}")
    values: dict[str, object] = {"data.val_size": 0, "data.train_fraction": 1.0,
                                 "tta": TrainConfig().tta}
    if epochs is not None:
        values["optim.epochs"] = float(epochs)
    out.config = out.config.with_values(values)
    return out
