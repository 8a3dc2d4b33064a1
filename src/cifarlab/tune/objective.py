"""The objective: train with a trial's parameters and return the study's validation metric
(:mod:`cifarlab.tune.metric`; never a test figure), reporting each epoch to the pruner and
recording failures with their reasons and the doctor's findings, so the surrogate learns where
not to go."""

from __future__ import annotations

import gc
import math
import os
import socket
from pathlib import Path
from typing import Any, NoReturn

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cifarlab.callbacks import Callback, StopReason, TrainResult, TrainState
from cifarlab.config import TrainConfig
from cifarlab.doctor.findings import Report
from cifarlab.doctor.monitor import DoctorMonitor
from cifarlab.errors import ConfigError
from cifarlab.tblog import TensorBoardWriter
from cifarlab.trainer import train
from cifarlab.tune.interrupt import StopFlag
from cifarlab.tune.metric import METRICS, Metric, study_metric
from cifarlab.tune.samplers import IMPUTE_ATTR
from cifarlab.tune.space import SearchSpace
from cifarlab.tune.storage import study_space
from cifarlab.tune.target import is_duplicate, study_base, target_config

__all__ = ["REPEAT_ATTR", "Objective", "TargetObjective", "TrialFailed", "TrialInterrupted"]

REPEAT_ATTR = "repeat_of"  # user attr: the earlier trial whose result a repeated config reused


class TrialFailed(Exception):
    """The trial's training went wrong in a way its parameters explain (NaN loss, OOM)."""


class TrialInterrupted(Exception):
    """Ctrl-C during the trial."""


class Objective:
    """Train with the trial's parameters; return the validation metric (never a test figure).

    The metric is reported after every epoch so a pruner can stop the trial; a non-finite
    training loss ends the trial at once, as a failure with its reason stored in the study.
    """

    kind = "trial"  # the prefix of each trial's TensorBoard folder
    report_by_step = False  # report at optimizer steps, not epochs (moves that pause anywhere)
    # a configuration the study completed before is answered from that trial, not trained again
    # (every trial trains with the same seed: on the CPU it would repeat its result exactly)
    reuse_repeats = True

    def __init__(self, space: SearchSpace, base: TrainConfig, data: Any, stop: StopFlag,
                 train_seed: int = 0, check_every: int = 10, tensorboard: Path | None = None,
                 metric: Metric = METRICS["loss"]):
        self.space, self.base, self.data, self.stop = space, base, data, stop
        self.metric = metric
        self.train_seed, self.check_every = train_seed, check_every
        self.tensorboard = tensorboard  # a folder: each trial writes event files under it

    def config(self, trial: optuna.Trial) -> TrainConfig:
        """The trial's training config (a :class:`ConfigError` fails the trial)."""
        return self.base.with_values(self.space.suggest(trial))

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            config = self.config(trial)
            config.seed = self.train_seed  # same seed for every trial: compare like with like
            config.validate()
        except ConfigError as exc:
            return self._fail(trial, "config", str(exc), impute=True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if self.reuse_repeats and (twin := _completed_twin(trial)) is not None:
            # a finite space (categorical, integer, stepped parameters) runs out of new
            # configurations, and samplers then propose tried ones (Optuna's FAQ answers them
            # from the earlier trial, as here)
            trial.set_user_attr(REPEAT_ATTR, twin.number)
            for key in ("val_loss", "val_acc", "val_cal_loss", "epochs"):
                if key in twin.user_attrs:
                    trial.set_user_attr(key, twin.user_attrs[key])
            assert twin.value is not None
            return twin.value
        watch = _TrialWatch(trial, self.stop, self.check_every, self.metric,
                            self.report_by_step)
        monitor = DoctorMonitor(num_classes=len(self.data.classes))
        callbacks: list[Callback] = [watch, monitor]
        if self.tensorboard is not None:
            callbacks.append(TensorBoardWriter(
                self.tensorboard / f"{self.kind}-{trial.number}", monitor))
        try:
            result = self.fit(trial, config, callbacks)
        except Exception as exc:
            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            _free_device_memory()
            kind = "oom" if oom else "exception"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _record_doctor(trial, monitor.report, failed=True)
            return self._fail(trial, kind, reason, impute=True)
        trial.set_user_attr("epochs", len(result.history))
        trial.set_user_attr("train_seconds", round(result.train_seconds, 2))
        stop = result.stopped_early
        by_doctor = stop is not None and stop.by == "doctor"
        finding = _record_doctor(trial, monitor.report,
                                 failed=watch.failure is not None or by_doctor)
        if watch.failure is not None:
            return self._fail(trial, "nonfinite", _with_finding(watch.failure, finding),
                              impute=True)
        if stop is not None and by_doctor:
            return self._fail(trial, stop.kind, str(stop), impute=True)
        if watch.interrupted:
            return self._fail(trial, "interrupted", "interrupted by Ctrl-C", impute=False)
        if watch.pruned:
            raise optuna.TrialPruned(f"pruned after epoch {watch.pruned_at}")
        figures = {"val_loss": result.val_loss, "val_acc": result.val_acc,
                   "val_cal_loss": result.val_cal_loss}
        value = self.metric.value(figures)
        if value is None:  # _worker checks val_size > 0, so this is a bug
            raise RuntimeError(f"training returned no {self.metric.column}")
        if not math.isfinite(value):
            return self._fail(trial, "nonfinite", f"{self.metric.column} is {value}",
                              impute=True)
        for key, v in figures.items():
            trial.set_user_attr(key, v)
        return value

    def fit(self, trial: optuna.Trial, config: TrainConfig, callbacks: list[Callback]
            ) -> TrainResult:
        """Train the trial's config (a subclass may continue it from a checkpoint)."""
        return train(config, callbacks, data=self.data, evaluate_test=False, progress=False)

    @staticmethod
    def _fail(trial: optuna.Trial, kind: str, reason: str, impute: bool) -> NoReturn:
        trial.set_user_attr("fail_kind", kind)
        trial.set_user_attr("fail_reason", reason)
        if impute:
            trial.set_user_attr(IMPUTE_ATTR, True)
        if kind == "interrupted":
            raise TrialInterrupted(reason)
        raise TrialFailed(reason)


def _completed_twin(trial: optuna.Trial) -> FrozenTrial | None:
    """The first completed trial of the study with ``trial``'s parameters, if any."""
    params = trial.params
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.params == params and t.value is not None:
            return t
    return None


class TargetObjective(Objective):
    """A trial of the target study: the baseline or a search winner at the target budget (see
    :mod:`cifarlab.tune.target`); ``data`` is the whole training split."""

    kind = "target"
    reuse_repeats = False  # (its trials hold no parameters: is_duplicate guards it)

    def __init__(self, study: optuna.Study, data: Any, stop: StopFlag, train_seed: int = 0,
                 device: str = "auto", tensorboard: Path | None = None):
        super().__init__(study_space(study), study_base(study), data, stop, train_seed,
                         tensorboard=tensorboard, metric=study_metric(study))
        self.study, self.device = study, device

    def config(self, trial: optuna.Trial) -> TrainConfig:
        role = trial.user_attrs.get("role")
        if role is None:  # another worker took the queued trial first: nothing to do
            raise optuna.TrialPruned("no target work left")
        if is_duplicate(trial.study, trial.number):
            # two machines that start one study at the same moment may both queue it
            trial.set_user_attr("duplicate", True)
            raise optuna.TrialPruned("the same target trial ran or runs already")
        cfg = target_config(self.study, role, trial.user_attrs.get("source_trial"))
        return cfg.with_values({"device": self.device})


def _record_doctor(trial: optuna.Trial, report: Report, failed: bool) -> str | None:
    """Store the doctor's findings on the trial (user attr ``doctor``); returns the message of
    the worst one. A failed trial always gets the attribute, empty when the monitors saw no
    symptom before the failure."""
    report.consolidate()
    alarms = sorted(report.alarms(), key=lambda f: -f.severity)
    if alarms or failed:
        trial.set_user_attr("doctor", [{"rule": f.rule, "severity": str(f.severity),
                                        "message": f.message} for f in alarms])
    return alarms[0].message if alarms else None


def _with_finding(reason: str, finding: str | None) -> str:
    return f"{reason}; doctor: {finding}" if finding else reason


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _TrialWatch(Callback):
    """Trainer callback: reports the metric per epoch, prunes, and stops on NaN/Inf."""

    def __init__(self, trial: optuna.Trial, stop: StopFlag, check_every: int, metric: Metric,
                 by_step: bool = False):
        self.trial, self.stop, self.check_every = trial, stop, check_every
        self.metric, self.by_step = metric, by_step
        self.failure: str | None = None
        self.pruned = False
        self.pruned_at = 0
        self.interrupted = False

    def on_step_end(self, state: TrainState, loss: torch.Tensor, inputs: torch.Tensor,
                    labels: torch.Tensor) -> None:
        # A NaN never heals, so checking every k steps loses at most k steps and avoids a
        # device sync per step on a GPU.
        if state.step % self.check_every == 0 or state.step == state.total_steps:
            value = float(loss)
            if not math.isfinite(value):
                self.failure = f"training loss became {value} at step {state.step}"
                state.stop(StopReason("tune", "nonfinite", self.failure))
        if self.stop.requested and not state.should_stop:
            self.interrupted = True
            state.stop(StopReason("user", "interrupted", "interrupted by Ctrl-C"))

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.failure or self.interrupted:
            return
        value = self.metric.value(metrics)
        if value is None:
            return
        loss = metrics.get("val_loss")
        if not math.isfinite(value) or (loss is not None and not math.isfinite(loss)):
            self.failure = (f"validation loss became {loss if loss is not None else value} "
                            f"after epoch {metrics['epoch']}")
            state.stop(StopReason("tune", "nonfinite", self.failure))
            return
        self.trial.report(value, state.step if self.by_step else metrics["epoch"])
        if state.step < state.total_steps and self.trial.should_prune():
            self.pruned, self.pruned_at = True, metrics["epoch"]
            state.stop(StopReason("tune", "pruned", f"pruned after epoch {metrics['epoch']}"))
