"""A study run under the freeze-thaw rule (``cifarlab tune --sampler freeze-thaw``).

How it maps onto Optuna's model, so that storage, workers and the dashboard keep working:

* **A trial is one configuration**, trained at the target budget itself (the whole training
  split, the target's epochs, the same config as the target check of :mod:`.target`) in *moves*
  that stop at rungs, fractions of the target (1/9, 1/3, 1). A move continues from the trial's
  checkpoint (:mod:`cifarlab.checkpoint`) in ``<study folder>/checkpoints/<trial number>-<params
  digest>/``, removed when the trial finishes; the schedule is the target's, so a trial
  continued rung by rung ends with the weights of one that ran straight through. A
  configuration already in the study is never started again (its curve would repeat).
* **Between moves a trial is paused**: Optuna state WAITING, its curve so far in its
  intermediate values (step = optimizer steps: every epoch's end and every move's end) and in
  the user attr ``ft`` (the same points by budget, the rung reached, and each move's budget,
  seconds and worker). Any worker that sees the shared storage can continue it, on another
  machine too when the study folder is shared. On SQLite with several workers, a worker
  continues only the trials it started: SQLite cannot claim a trial atomically across
  processes (PostgreSQL can: SELECT ... FOR UPDATE).
* **A trial that reaches the target** is COMPLETE with the study's metric there: one trial, its
  whole curve in its intermediate values. It is already at the target budget, so its check
  there is a copy (:func:`record_candidates`), not a second training.
* **Which move next** is :class:`cifarlab.tune.freezethaw.FreezeThaw`'s decision: start a new
  configuration or continue a paused one, by expected improvement at the target per second.
* **``--n-trials`` counts compute**: the study stops making moves once it has trained
  ``n_trials`` target budgets in all (a plain study's ``n_trials`` trials at its fidelity cost
  about that at the target), and ``--timeout`` stops it at a move that would end past it.

Pruners have nothing to do here: the rule itself decides how far each configuration trains.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna._gp.search_space import SearchSpace as GPSpace
from optuna._gp.search_space import _round_one_normalized_param, _ScaleType, _unnormalize_one_param
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from cifarlab.callbacks import Callback, TrainResult
from cifarlab.config import TrainConfig
from cifarlab.errors import ConfigError
from cifarlab.optim import schedule_progress
from cifarlab.trainer import train
from cifarlab.tune.freezethaw import DONE, PAUSED, RUNNING, CostModel, Curve, FreezeThaw
from cifarlab.tune.interrupt import StopFlag
from cifarlab.tune.metric import study_metric
from cifarlab.tune.objective import Objective, TrialFailed, TrialInterrupted
from cifarlab.tune.space import SearchSpace
from cifarlab.tune.storage import study_space
from cifarlab.tune.target import CANDIDATE, candidates, study_base, target_config

__all__ = ["FT_ATTR", "RUNGS", "FreezeThawObjective", "FreezeThawRunner", "checkpoint_folder",
           "distributions", "params_key", "progress_of", "record_candidates", "snap_to_grid"]

FT_ATTR = "ft"
RUNGS = (1 / 9, 1 / 3, 1.0)


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """The space's parameters as Optuna distributions (a freeze-thaw study needs every
    parameter in every trial, so conditional ones are refused)."""
    out: dict[str, BaseDistribution] = {}
    for p in space.params:
        if p.when:
            raise ConfigError(f"Parameter {p.name!r} is conditional (when:); --sampler "
                              "freeze-thaw needs every parameter in every trial. Use "
                              "--sampler gp for this space.")
        if p.kind == "float":
            out[p.name] = FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.log,
                                            step=p.step)
        elif p.kind == "int":
            out[p.name] = IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log,
                                          step=int(p.step or 1))
        else:
            out[p.name] = CategoricalDistribution(list(p.choices))
    return out


def snap_to_grid(gp_space: GPSpace) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of normalized points -> the nearest points of the space: integer and stepped
    parameters on their values (``lr`` with ``step: 0.01``, ``cutout`` with ``step: 4``), as
    Optuna's own samplers draw them. Without it a point between two values becomes a parameter
    the trial's distribution does not contain, and Optuna refuses the trial."""
    types, bounds, steps = gp_space._scale_types, gp_space._bounds, gp_space._steps

    def snap(x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=float, copy=True)
        for i, (kind, step) in enumerate(zip(types, steps, strict=True)):
            scale = _ScaleType(int(kind))
            if scale != _ScaleType.CATEGORICAL and step != 0.0:
                out[..., i] = _round_one_normalized_param(
                    out[..., i], scale, (bounds[i, 0], bounds[i, 1]), float(step))
        return out

    return snap


_SCHEDULE = ("optim.warmup_frac", "optim.lr_start", "optim.lr_end")


def progress_of(space: SearchSpace, base: TrainConfig
                ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``(normalized rows, budgets) -> schedule progress`` of the study's configurations
    (:func:`cifarlab.optim.schedule_progress`): the schedule's warm-up and end points come
    from each row where the space searches them, else from the study's base config. Rows are
    in the column order of ``GPSpace(distributions(space))``, as a study encodes them. Columns
    are unnormalized whole (as Optuna's own unnormalization, clipped to the bounds), not row by
    row: a decision maps every observed point of every curve."""
    cfg = space.base_config(base)
    fixed = {path: float(cfg.get(path)) for path in _SCHEDULE}
    dists = distributions(space)
    names = list(dists)
    searched = {p.path: p.name for p in space.params if p.path in _SCHEDULE}

    def column(x: np.ndarray, name: str) -> np.ndarray:
        d, i = dists[name], names.index(name)
        if isinstance(d, CategoricalDistribution):
            return np.array([d.choices[int(v)] for v in x[:, i]], dtype=float)
        assert isinstance(d, FloatDistribution | IntDistribution)
        scale = _ScaleType.LOG if d.log else _ScaleType.LINEAR
        values = _unnormalize_one_param(x[:, i], scale, (d.low, d.high), float(d.step or 0.0))
        values = np.clip(values, d.low, d.high)
        return np.round(values) if isinstance(d, IntDistribution) else values

    def progress(x: np.ndarray, budget: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=float))
        cols = {path: column(x, searched[path]) if path in searched else np.full(len(x), v)
                for path, v in fixed.items()}
        return schedule_progress(budget, *(cols[path] for path in _SCHEDULE))

    return progress


def params_key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_folder(folder: Path, number: int, params: dict[str, Any]) -> Path:
    """Where trial ``number`` keeps its paused state: a folder of its own, named by its number
    and its parameters' digest. Two trials may hold the same parameters (two workers that start
    the same configuration at once), and must not share a checkpoint. Trials paused by an
    earlier cifarlab keep theirs under the digest alone; that folder is used while it exists."""
    earlier = folder / params_key(params)
    return earlier if earlier.is_dir() else folder / f"{number}-{params_key(params)}"


class FreezeThawObjective(Objective):
    """One move of a trial: its config at the target budget, trained from its checkpoint to
    ``to_budget`` (set before each call), the metric reported at the optimizer step reached."""

    kind = "ft"
    report_by_step = True
    reuse_repeats = False  # (the policy never starts a configuration twice)

    def __init__(self, study: optuna.Study, data: Any, stop: StopFlag, folder: Path,
                 train_seed: int = 0, device: str = "auto",
                 tensorboard: Path | None = None) -> None:
        super().__init__(study_space(study), study_base(study), data, stop, train_seed,
                         tensorboard=tensorboard, metric=study_metric(study))
        self.study, self.device, self.folder = study, device, folder
        self.to_budget = 1.0
        self.total_steps = 1  # of the last config trained

    def config(self, trial: optuna.Trial) -> TrainConfig:
        """The trial's config at the target budget: the target check's own."""
        return target_config(self.study, CANDIDATE, trial.number).with_values(
            {"device": self.device})

    def fit(self, trial: optuna.Trial, config: TrainConfig, callbacks: list[Callback]
            ) -> TrainResult:
        per_epoch = max(1, len(self.data.train) // config.optim.batch_size)  # as the loader
        self.total_steps = max(1, math.ceil(per_epoch * config.optim.epochs))
        pause = None
        if self.to_budget < 1.0 - 1e-9:
            pause = max(1, math.ceil(self.to_budget * self.total_steps))
        return train(config, callbacks, data=self.data, evaluate_test=False, progress=False,
                     checkpoint=checkpoint_folder(self.folder, trial.number, trial.params),
                     pause_at_step=pause)


class FreezeThawRunner:
    """One worker's moves in a freeze-thaw study (see the module docstring)."""

    def __init__(self, study: optuna.Study, objective: FreezeThawObjective, seed: int,
                 n_startup: int, worker: int, own_trials_only: bool) -> None:
        self.study, self.objective = study, objective
        self.dists = distributions(study_space(study))
        self.gp_space = GPSpace(self.dists)
        self.worker, self.own_only = worker, own_trials_only
        self.exhausted = False  # no move left in the space (see step)
        self.policy = FreezeThaw(
            RUNGS, lambda rng, n: self.gp_space.sample_normalized_params(n, rng),
            n_startup=n_startup, seed=seed, is_categorical=self.gp_space.is_categorical,
            snap=snap_to_grid(self.gp_space),
            progress=progress_of(study_space(study), study_base(study)))

    # ------------------------------------------------------------------ the study's state
    def curves(self) -> tuple[list[Curve], list[FrozenTrial], CostModel]:
        trials = [t for t in self.study.get_trials(deepcopy=False)
                  if self.dists.keys() <= t.params.keys()]
        curves, moves = [], []
        for t in trials:
            ft = t.user_attrs.get(FT_ATTR, {})
            x = self.gp_space.get_normalized_params([t], [{k: t.params[k] for k in self.dists}])[0]
            c = Curve(x=x, budgets=list(ft.get("budgets", [])), values=list(ft.get("values", [])),
                      reached=float(ft.get("budget", 0.0)))
            moves += [(float(m[0]), float(m[1])) for m in ft.get("moves", [])]
            if t.state == TrialState.WAITING and c.budget < 1.0 - 1e-9 and (
                    not self.own_only or ft.get("worker") == self.worker):
                c.state = PAUSED
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                c.state = RUNNING  # (another worker's, or not ours to continue)
            else:
                c.state = DONE
                if t.state == TrialState.FAIL and t.user_attrs.get("impute_as_worst"):
                    c.budgets.append(self.policy.next_rung(c.budget) if c.budget < 1 else 1.0)
                    c.values.append(math.inf)  # counted as the worst loss seen
            curves.append(c)
        return curves, trials, CostModel.learn(moves, default=CostModel(rate=1.0))

    def compute_used(self) -> float:
        """Target budgets trained so far, all trials together."""
        return sum(t.user_attrs.get(FT_ATTR, {}).get("budget", 0.0)
                   for t in self.study.get_trials(deepcopy=False))

    # ------------------------------------------------------------------ one move
    def step(self, deadline: float | None, table: Any) -> bool:
        """Decide and make one move; False when no move fits before ``deadline``."""
        curves, trials, cost = self.curves()
        d = self.policy.decide(curves, cost)
        if d is None:  # a finite space, every configuration started, none paused
            if not self.exhausted and not getattr(table, "quiet", True):
                table.write("note: every configuration of the search space has been started "
                            "and none is paused: no move is left.")
            self.exhausted = True
            return False
        start = 0.0 if d.index is None else curves[d.index].budget
        if deadline is not None and len(trials) > 0 and (
                time.monotonic() + cost.seconds(start, d.to_budget) > deadline):
            return False
        if d.index is None:
            params = self.gp_space.get_unnormalized_param(d.x)
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, params=params, distributions=self.dists,
                user_attrs={FT_ATTR: {"budgets": [], "values": [], "moves": [], "budget": 0.0,
                                      "worker": self.worker}})
            tid = self.study._storage.create_new_trial(self.study._study_id, template)
        else:
            tid = trials[d.index]._trial_id
            if not self.study._storage.set_trial_state_values(tid, TrialState.RUNNING):
                return True  # another worker took it first: decide again
        self._run(tid, d.to_budget)
        table(self.study, self.study._storage.get_trial(tid))
        return True

    def _run(self, trial_id: int, to_budget: float) -> None:
        storage = self.study._storage
        trial = optuna.Trial(self.study, trial_id)
        ft = dict(trial.user_attrs.get(FT_ATTR, {}))
        self.objective.to_budget = to_budget
        t0 = time.perf_counter()
        try:
            with get_heartbeat_thread(trial_id, storage):
                value = self.objective(trial)
        except TrialInterrupted:
            storage.set_trial_state_values(trial_id, TrialState.WAITING)  # stays paused
            return
        except (TrialFailed, optuna.TrialPruned):
            self.study.tell(trial, state=TrialState.FAIL)
            return
        ft["moves"] = [*ft.get("moves", []), [to_budget - ft.get("budget", 0.0),
                                             round(time.perf_counter() - t0, 3),
                                             f"{socket.gethostname()}:{os.getpid()}"]]
        # every point the trial reported (each epoch's end, and the move's end), by budget
        reported = self.study._storage.get_trial(trial_id).intermediate_values
        total = self.objective.total_steps
        ft["budgets"] = [min(1.0, step / total) for step in sorted(reported)]
        ft["values"] = [reported[step] for step in sorted(reported)]
        ft["budget"] = to_budget
        trial.set_user_attr(FT_ATTR, ft)
        if to_budget >= 1.0 - 1e-9:
            self.study.tell(trial, value)
            # finished: nothing will continue it (train --from-study retrains the answer)
            shutil.rmtree(checkpoint_folder(self.objective.folder, trial.number, trial.params),
                          ignore_errors=True)
        else:
            storage.set_trial_state_values(trial_id, TrialState.WAITING)


def record_candidates(study: optuna.Study, target_study: optuna.Study, k: int) -> int:
    """The top ``k`` completed trials of a freeze-thaw study are already at the target: copy
    them into the target study as completed candidates (once each); returns how many."""
    present = {t.user_attrs.get("source_trial") for t in target_study.get_trials(deepcopy=False)
               if t.user_attrs.get("role") == CANDIDATE}
    added = 0
    for t in candidates(study, k):
        if t.number in present:
            continue
        attrs: dict[str, Any] = {key: t.user_attrs[key] for key in (
            "val_loss", "val_acc", "val_cal_loss") if key in t.user_attrs}
        target_study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=t.value,
            user_attrs={"role": CANDIDATE, "source_trial": t.number, "copied": True, **attrs}))
        added += 1
    return added
