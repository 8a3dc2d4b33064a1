"""The target budget: a study answers for the budget the user will train at.

Search trials are cheap (the space's fidelity: fewer epochs, part of the training split), and a
cheap winner need not win at the real budget. The *target* is the whole training split for
``Target.epochs`` epochs (default: the recipe's). Two kinds of trial run there, in a second Optuna
study beside the search study (same storage, named ``<study>::target``) so that samplers and
pruners only ever see one fidelity:

* the **baseline**, first: the configuration the study started from (the model's recipe, or the
  user's ``--config``) untouched, so the study knows what it has to beat;
* the **candidates**, after the search: its ``Target.top_k`` best distinct configurations.

The **answer** is the best of these on the study's metric (:mod:`cifarlab.tune.metric`) at
the target budget. A candidate must
beat the baseline to be the answer; when none does, the baseline is the answer and the study
says so. Target trials store only references (``role``, ``source_trial``), and their configs are
rebuilt from the study's own attributes, so any worker that reaches the storage can run them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cifarlab.config import TrainConfig
from cifarlab.errors import ConfigError, StudyError
from cifarlab.models import default_config
from cifarlab.tune.samplers import rank_by_posterior_mean
from cifarlab.tune.storage import study_space

__all__ = [
    "BASE_ATTR",
    "PICKED_BY",
    "TARGET_ATTR",
    "Answer",
    "Target",
    "answer",
    "enqueue_baseline",
    "enqueue_candidates",
    "is_duplicate",
    "open_target",
    "picks",
    "study_base",
    "study_target",
    "target_config",
    "target_name",
    "target_pending",
]

TARGET_ATTR = "cifarlab:target"
BASE_ATTR = "cifarlab:base"
BASELINE, CANDIDATE = "baseline", "candidate"
PICKED_BY = "picked_by"  # a candidate's ranks in the search (see picks)


@dataclass(frozen=True)
class Target:
    """The budget the study's answer is for, and how many search winners are re-checked."""

    epochs: float
    top_k: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Target:
        return cls(float(raw["epochs"]), int(raw.get("top_k", 2)))

    def check(self) -> Target:
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"--target-epochs must be a number > 0, got {self.epochs}.")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}.")
        return self


def target_name(study_name: str) -> str:
    return f"{study_name}::target"


def open_target(study: optuna.Study) -> optuna.Study:
    """The target study of ``study`` (created on first use, in the same storage)."""
    name = target_name(study.study_name)
    try:
        return optuna.load_study(study_name=name, storage=study._storage)
    except KeyError:
        return optuna.create_study(study_name=name, storage=study._storage,
                                   direction="minimize", load_if_exists=True)


def study_target(study: optuna.Study) -> Target | None:
    """The study's target, or None for a study made before targets existed."""
    raw = study.user_attrs.get(TARGET_ATTR)
    return None if raw is None else Target.from_dict(raw)


def study_base(study: optuna.Study) -> TrainConfig:
    """The configuration the study started from: the user's config, else the model's recipe."""
    raw = study.user_attrs.get(BASE_ATTR)
    if raw is not None:
        return TrainConfig.from_dict(raw)
    return default_config(study_space(study).fidelity.model)


def _at_target(cfg: TrainConfig, target: Target) -> TrainConfig:
    # the whole training split (validation still held out), the target's epochs, no TTA: the
    # same validation measurement as a search trial's, at the budget the answer is for
    return cfg.with_values({"optim.epochs": target.epochs, "data.train_fraction": 1.0,
                            "tta": 0})


def target_config(study: optuna.Study, role: str, source_trial: int | None) -> TrainConfig:
    """The config of a target trial: the baseline's, or search trial ``source_trial``'s."""
    target = study_target(study)
    if target is None:
        raise StudyError(f"Study {study.study_name!r} has no target budget.")
    base = study_base(study)
    if role == BASELINE:
        return _at_target(base, target)
    if source_trial is None:
        raise StudyError("a candidate target trial without its source trial")
    params = study.get_trials(deepcopy=False)[source_trial].params  # numbers are indices
    return _at_target(study_space(study).config_for(params, start=base), target)


def _live(trial: FrozenTrial) -> bool:
    """Done, running, queued, or failed for a reason of its own (not Ctrl-C): no need to run it
    again. A trial lost to a dead worker is retried by the heartbeat callback as a new one."""
    if trial.state == TrialState.FAIL:
        return trial.user_attrs.get("fail_kind") not in (None, "interrupted")
    return True


def enqueue_baseline(study: optuna.Study, target_study: optuna.Study) -> bool:
    """Queue the baseline unless it ran or is queued; True if queued now."""
    if any(t.user_attrs.get("role") == BASELINE and _live(t)
           for t in target_study.get_trials(deepcopy=False)):
        return False
    target_study.enqueue_trial({}, user_attrs={"role": BASELINE, "source_trial": None})
    return True


def candidates(study: optuna.Study, k: int, noisy: bool = False) -> list[FrozenTrial]:
    """The ``k`` best completed search trials with distinct parameters, best first.

    With ``noisy`` (a training run's loss: another seed, another loss) the best observation is
    often a lucky draw, so the list alternates between the trials with the lowest GP posterior
    mean (the surrogate the GP sampler fits, smoothing each trial with its neighbours) and the
    best observations, starting with the posterior mean; with too few trials for a GP it is the
    best observations alone.
    """
    return [t for t, _ in picks(study, k, noisy)]


def picks(study: optuna.Study, k: int, noisy: bool = False) -> list[tuple[FrozenTrial, str]]:
    """:func:`candidates`, each with why it was picked: its rank by posterior mean (when
    ``noisy``) and by observed value, e.g. ``"posterior mean #1, observed #3"``."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.value is not None and math.isfinite(t.value)),
                  key=lambda t: (t.value, t.number))
    by_mean = rank_by_posterior_mean(study, done) if noisy else []
    order = _alternate(by_mean, done) if by_mean else done
    out: list[FrozenTrial] = []
    seen: list[dict[str, Any]] = []
    for t in order:
        if t.params not in seen:
            seen.append(t.params)
            out.append(t)
        if len(out) == k:
            break
    mean_rank = {t.number: i + 1 for i, t in enumerate(by_mean)}
    observed_rank = {t.number: i + 1 for i, t in enumerate(done)}
    return [(t, ", ".join(([f"posterior mean #{mean_rank[t.number]}"]
                           if t.number in mean_rank else [])
                          + [f"observed #{observed_rank[t.number]}"])) for t in out]


def _alternate(first: list[FrozenTrial], second: list[FrozenTrial]) -> list[FrozenTrial]:
    """``first[0], second[0], first[1], second[1], ...``, then the longer list's rest."""
    out: list[FrozenTrial] = []
    for i in range(max(len(first), len(second))):
        out += [lst[i] for lst in (first, second) if i < len(lst)]
    return out


def enqueue_candidates(study: optuna.Study, target_study: optuna.Study, k: int,
                       noisy: bool = False) -> int:
    """Queue the search's top ``k`` (see :func:`candidates`) for the target budget (those not
    queued or run yet, and not the baseline's own configuration); returns how many."""
    present = {t.user_attrs.get("source_trial") for t in target_study.get_trials(deepcopy=False)
               if t.user_attrs.get("role") == CANDIDATE and _live(t)}
    if len(present) >= k:
        # the search is over when candidates are queued, so its picks stand: no GP fit again
        # each time a waiting worker looks
        return 0
    baseline = target_config(study, BASELINE, None)
    queued = 0
    for t, why in picks(study, k, noisy):
        if t.number in present:
            continue
        if target_config(study, CANDIDATE, t.number) == baseline:
            continue  # the search found the recipe itself: the baseline already answers for it
        target_study.enqueue_trial({}, user_attrs={"role": CANDIDATE, "source_trial": t.number,
                                                   PICKED_BY: why})
        queued += 1
    return queued


def is_duplicate(target_study: optuna.Study, number: int) -> bool:
    """Whether an earlier target trial with the same role and source ran, runs, or failed on
    its own account: then trial ``number`` would repeat it."""
    trials = target_study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == number)
    key = (me.user_attrs.get("role"), me.user_attrs.get("source_trial"))
    return any(t.number < number and t.state != TrialState.WAITING and _live(t)
               and not t.user_attrs.get("duplicate")
               and (t.user_attrs.get("role"), t.user_attrs.get("source_trial")) == key
               for t in trials)


def target_pending(target_study: optuna.Study) -> tuple[bool, bool]:
    """(a target trial is waiting, a target trial is running)."""
    trials = target_study.get_trials(deepcopy=False, states=(TrialState.WAITING,
                                                             TrialState.RUNNING))
    return (any(t.state == TrialState.WAITING for t in trials),
            any(t.state == TrialState.RUNNING for t in trials))


@dataclass
class Answer:
    """What a study recommends at its target budget, next to its baseline."""

    target: Target | None
    baseline: FrozenTrial | None  # the baseline's target trial, once complete
    best: FrozenTrial | None  # the best complete target trial (the answer), baseline included
    evaluated: list[FrozenTrial]  # complete target trials, best first

    @property
    def is_baseline(self) -> bool:
        return self.best is not None and self.best.user_attrs.get("role") == BASELINE

    @property
    def source_trial(self) -> int | None:
        return None if self.best is None else self.best.user_attrs.get("source_trial")

    @property
    def improvement(self) -> float | None:
        """Baseline's metric minus the answer's (> 0: the study paid off)."""
        if self.best is None or self.baseline is None:
            return None
        assert self.best.value is not None and self.baseline.value is not None
        return self.baseline.value - self.best.value


def answer(study: optuna.Study) -> Answer:
    target = study_target(study)
    if target is None:
        return Answer(None, None, None, [])
    done = [t for t in open_target(study).get_trials(deepcopy=False,
                                                     states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
            and t.user_attrs.get("role") in (BASELINE, CANDIDATE)]
    done.sort(key=lambda t: (t.value, t.user_attrs.get("role") != BASELINE, t.number))
    baseline = next((t for t in done if t.user_attrs.get("role") == BASELINE), None)
    best = done[0] if done else None
    if baseline is not None and best is not None and best.value == baseline.value:
        best = baseline  # a tie is not an improvement
    return Answer(target, baseline, best, done)
