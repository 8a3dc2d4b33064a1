"""Which configuration to train next, and how far: cost-aware freeze-thaw decisions.

A study under this policy holds *curves*: configurations trained to some budget (a fraction of
the target budget) and then paused, ready to be continued from their checkpoint, or finished at
the target. Each decision is one of two moves:

* **start** a new configuration and train it to the first rung, ``rungs[0]``;
* **continue** a paused one from its budget to the next rung.

Both are scored the same way: the expected improvement, *at the target budget*, of the
configuration's loss over the incumbent (the best posterior mean at the target among the
configurations tried), divided by the seconds still needed to take the configuration to the
target (a new one: all of them; a paused one: from its budget on; charging only the next move
made starting always look cheaper, and the rule then finished no configuration). The
learning-curve GP (:mod:`.curves`) supplies the prediction at the target from whatever part of
a curve was seen, and the seconds are learned from the moves made so far (:class:`CostModel`).
A configuration that looks good after a short run is continued when its chance to win at the
target is worth the seconds; one that looks poor stays paused, and may be continued later when
the others turn out worse (freeze-thaw, Swersky et al. 2014), which successive halving never
does.

That score treats a run as if it went to the target whatever it showed, and so does not price
the option to stop a poor run after its next rung. ``option=True`` scores by the Gittins index
of the staged run instead (:mod:`.gittins`), which does. Measured (``bench/mf_replay.py``, 20
seeds, 2026-11-28): on AugmentedBranin it reached the best peer's final regret at 12.4 units
against 12.9; on the recorded CIFAR-10 tables, with both rules restricted to the tables' rows, at
12.0 against 11.4 and 13.9 against 6.0. The real curves decide: off by default.

Two measured choices shape the model's view of the curves (``bench/mf_replay.py``, recorded
CIFAR-10 curves, 40 seeds: the best of 200 configurations found on 22 of 40 seeds with both,
9 of 40 without):

* **Budget as schedule progress** (``progress``): a run's budget is measured by how much of its
  learning-rate schedule it has spent, not by its share of the steps. After a ninth of its steps
  a run with a long warm-up is barely under way while one without warm-up is far along; on the
  share of steps the first looks worse than it will end.
* **Warped losses** (``warp``): the losses of all points are Yeo-Johnson transformed before the
  fit (:func:`.warping.warp_values`, as the GP sampler does), so that a few very poor early
  losses do not set the model's scale. Decisions are taken on the warped scale; the transform
  is monotone, so the best stays the best.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cifarlab.tune.curves import CurveModel, DecayCurveModel, fit_curves, fit_decay_curves
from cifarlab.tune.gittins import log_ei, log_stage_index
from cifarlab.tune.warping import warp_values

__all__ = ["CostModel", "Curve", "Decision", "FreezeThaw", "log_ei"]

PAUSED, RUNNING, DONE = "paused", "running", "done"
SAME = 1e-9  # normalized coordinates closer than this in every dimension: one configuration
_DRAWS = 100  # random draws for an untried configuration before the space counts as exhausted


@dataclass
class Curve:
    """One configuration's learning curve so far."""

    x: np.ndarray  # normalized hyperparameters
    budgets: list[float] = field(default_factory=list)  # fractions of the target, rising
    values: list[float] = field(default_factory=list)  # the loss at each
    state: str = PAUSED  # PAUSED (can be continued), RUNNING (by another worker), DONE
    reached: float | None = None  # the rung it was trained to, when not its last budget

    @property
    def budget(self) -> float:
        if self.reached is not None:
            return self.reached
        return self.budgets[-1] if self.budgets else 0.0


@dataclass(frozen=True)
class Decision:
    """Train ``x`` (curve ``index``, or a new one when None) from its budget to ``to_budget``."""

    index: int | None
    x: np.ndarray
    to_budget: float
    log_score: float  # log expected improvement at the target per second; -inf: no model yet


@dataclass(frozen=True)
class CostModel:
    """Seconds of a move that trains from budget ``a`` to ``b``: ``start`` (building the model,
    loading, the evaluation at the end of every move) plus ``rate`` per unit of budget."""

    rate: float = 1.0
    start: float = 0.0

    def seconds(self, a: float, b: float) -> float:
        return self.start + self.rate * max(b - a, 0.0)

    @classmethod
    def learn(cls, moves: list[tuple[float, float]], default: CostModel | None = None
              ) -> CostModel:
        """Least squares of seconds on budget over moves ``(budget trained, seconds)``, with
        both coefficients kept >= 0; ``default`` until two moves of different size exist."""
        default = default or cls()
        if len(moves) < 2:
            return default
        db = np.array([m[0] for m in moves], dtype=float)
        sec = np.array([m[1] for m in moves], dtype=float)
        if np.ptp(db) <= 0:
            return cls(rate=float(np.median(sec / np.maximum(db, 1e-12))), start=0.0)
        rate, start = np.polyfit(db, sec, 1)
        if start < 0 or rate <= 0:
            return cls(rate=float(max(np.sum(sec) / max(np.sum(db), 1e-12), 1e-12)), start=0.0)
        return cls(rate=float(rate), start=float(start))


class FreezeThaw:
    """The decision rule. ``rungs``: the budgets (fractions of the target) where a move may
    stop, rising to 1. ``n_startup``: configurations started at random before the model leads.
    ``sample``: ``(rng, n) -> n`` normalized random configurations (the space's own sampler, which
    knows its integer and categorical steps). ``snap``: rows of normalized points -> the nearest
    points the space holds (its integer and stepped values), applied to every candidate.
    ``kernel``: the learning-curve GP's, ``"joint"`` (:func:`.curves.fit_curves`) or ``"decay"``
    (:func:`.curves.fit_decay_curves`). ``progress``: ``(x rows, budgets) -> progress`` in (0, 1],
    1 at budget 1, the coordinate the model measures budget in (a study's:
    :func:`cifarlab.optim.schedule_progress` of each configuration's schedule); None: the budget
    itself. ``warp``: fit the model to Yeo-Johnson-warped losses (see the module docstring).
    ``option``: score a move that stops short of the target by its Gittins index, which prices
    the option to stop after any rung (:mod:`.gittins`); by default, by expected improvement
    per second to the target, as if the run went to the end whatever it showed: measured on the
    recorded CIFAR-10 curves the index did worse (``bench/mf_replay.py``, method
    ``cifarlab-mf-gittins``). The decay kernel's model has no joint posterior here and always
    scores the second way."""

    def __init__(self, rungs: tuple[float, ...], sample: Callable[[np.random.RandomState, int],
                                                                   np.ndarray],
                 n_startup: int = 10, n_candidates: int = 1024, seed: int | None = None,
                 is_categorical: np.ndarray | None = None, kernel: str = "joint",
                 snap: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 warp: bool = True, option: bool = False) -> None:
        if not rungs or any(b <= 0 or b > 1 for b in rungs) or list(rungs) != sorted(set(rungs)):
            raise ValueError(f"rungs must rise within (0, 1], got {rungs}")
        self.rungs = tuple(float(b) for b in rungs)
        if self.rungs[-1] != 1.0:
            self.rungs = (*self.rungs, 1.0)
        self.sample = sample
        self.n_startup = n_startup
        self.n_candidates = n_candidates
        self.rng = np.random.RandomState(seed)
        self.is_categorical = is_categorical
        if kernel not in ("joint", "decay"):
            raise ValueError(f"kernel must be 'joint' or 'decay', got {kernel!r}")
        self.kernel = kernel
        self.snap = snap
        self.progress = progress
        self.warp = warp
        self.option = option
        self.model: CurveModel | DecayCurveModel | None = None

    def next_rung(self, budget: float) -> float:
        return next(b for b in self.rungs if b > budget + 1e-9)

    def fit(self, curves: list[Curve]) -> CurveModel | DecayCurveModel | None:
        """Fit the learning-curve model to every point of every curve. Its budget coordinate is
        ``progress`` (when given) and its losses are warped (when ``warp``): ask it through
        :meth:`predict`, which answers on that scale."""
        pts = [(c.x, b, v) for c in curves for b, v in zip(c.budgets, c.values, strict=True)]
        if len(pts) < 3:
            return None
        x = np.array([p[0] for p in pts])
        b = np.array([p[1] for p in pts])
        y = np.array([p[2] for p in pts])
        # a diverged point counts as the worst finite loss seen
        if not np.all(np.isfinite(y)) and np.any(np.isfinite(y)):
            y = np.where(np.isfinite(y), y, np.nanmax(np.where(np.isfinite(y), y, np.nan)))
        if self.warp and np.all(np.isfinite(y)):
            y = warp_values(y)
        first = self.rungs[0]
        if self.progress is not None:
            b = self.progress(x, b)
            first = float(min(np.min(self.progress(x, np.full(len(x), first))), np.min(b)))
        if self.kernel == "decay":
            warm_d = self.model if isinstance(self.model, DecayCurveModel) else None
            self.model = fit_decay_curves(x, b, y, first, self.is_categorical, warm_d)
        else:
            warm_j = self.model if isinstance(self.model, CurveModel) else None
            self.model = fit_curves(x, b, y, first, self.is_categorical, warm=warm_j)
        return self.model

    def predict(self, x: np.ndarray, budget: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The fitted model's mean and standard deviation (on its warped scale) of rows ``x``
        after ``budget`` (a fraction of the target)."""
        if self.model is None:
            raise RuntimeError("predict before fit")
        x = np.atleast_2d(np.asarray(x, dtype=float))
        b = np.full(len(x), float(budget))
        if self.progress is not None and budget < 1.0:
            b = self.progress(x, b)
        return self.model.predict(x, b)

    def decide(self, curves: list[Curve], cost: CostModel) -> Decision | None:
        """The next move given every curve of the study (see the module docstring); None when
        no move is left: every configuration of a finite space has been started and none of
        them is paused.

        A configuration already in the study is never started again: training it anew repeats
        its curve (exactly, on the CPU), and a paused one is continued instead. In a space of
        integer, stepped or categorical parameters a candidate often snaps onto a configuration
        tried before."""
        first = self.rungs[0]
        tried = np.array([c.x for c in curves]) if curves else None
        model = self.fit(curves) if len(curves) >= self.n_startup else None
        if model is None:
            for _ in range(_DRAWS):  # (one draw, as before, wherever the space is continuous)
                x = self.sample(self.rng, 1)[0]
                if not _is_tried(x[None, :], tried)[0]:
                    return Decision(None, x, first, -math.inf)
            # a finite space, every configuration started before the model could lead
            if self.fit(curves) is None:
                return self._continue_lowest(curves)
        assert self.model is not None and tried is not None
        mean_t, _ = self.predict(tried, 1.0)
        best = float(mean_t.min())
        incumbent = tried[int(np.argmin(mean_t))]
        new = np.vstack([self.sample(self.rng, self.n_candidates),
                         self._local(incumbent, self.n_candidates // 4)])
        if self.snap is not None:
            new = self.snap(new)  # scored where they would really train
        new = new[~_is_tried(new, tried)]
        choice: Decision | None = None
        if len(new):
            new_score = self._log_index(new, 0.0, best, cost)
            i_new = int(np.argmax(new_score))
            choice = Decision(None, new[i_new], first, float(new_score[i_new]))
        at: dict[float, list[int]] = {}  # paused curves by budget
        for i in _paused(curves):
            at.setdefault(curves[i].budget, []).append(i)
        for budget, idx in at.items():
            score = self._log_index(np.array([curves[i].x for i in idx]), budget, best, cost)
            j = int(np.argmax(score))
            if choice is None or score[j] >= choice.log_score:
                i = idx[j]
                choice = Decision(i, curves[i].x, self.next_rung(budget), float(score[j]))
        return choice

    def _log_index(self, x: np.ndarray, budget: float, best: float, cost: CostModel
                   ) -> np.ndarray:
        """The log Gittins index (:func:`.gittins.log_stage_index`) of training configurations
        ``x`` (rows), all at ``budget``, on through the rungs left, free to stop after any: the
        expected improvement at the target per second that makes the run worth its cost."""
        rungs = [r for r in self.rungs if r > budget + 1e-9]
        ends = [budget, *rungs]
        costs = np.array([cost.seconds(a, b) for a, b in itertools.pairwise(ends)])
        if len(rungs) == 1 or not self.option or not isinstance(self.model, CurveModel):
            # one stage left, or a model without a joint posterior: EI per second to the end
            m, sd = self.predict(x, 1.0)
            return log_ei(m, sd, best) - math.log(max(cost.seconds(budget, 1.0), 1e-12))
        b = np.column_stack([np.full(len(x), r) for r in rungs])
        if self.progress is not None:
            b[:, :-1] = np.column_stack([self.progress(x, b[:, j]) for j in range(len(rungs) - 1)])
        mean, cov = self.model.joint(x, b)
        k = len(rungs)
        cov[:, np.arange(k - 1), np.arange(k - 1)] += self.model.noise_var  # reported losses
        return log_stage_index(mean, cov, best, costs)

    def _continue_lowest(self, curves: list[Curve]) -> Decision | None:
        """Without a model: the paused curve with the lowest last loss, to its next rung."""
        paused = _paused(curves)
        if not paused:
            return None
        i = min(paused, key=lambda k: curves[k].values[-1] if curves[k].values else math.inf)
        return Decision(i, curves[i].x, self.next_rung(curves[i].budget), -math.inf)

    def _local(self, center: np.ndarray, n: int) -> np.ndarray:
        """``n`` perturbations of ``center`` (Gaussian steps of 2-15% of the range on a random
        subset of the dimensions; categorical ones kept). They may fall between a stepped
        parameter's values: ``snap`` puts them back on the grid."""
        d = len(center)
        pick = self.rng.random_sample((n, d)) < max(1.0 / d, 0.3)
        step = self.rng.standard_normal((n, d)) * self.rng.choice([0.02, 0.05, 0.15], (n, 1))
        out = np.clip(center + np.where(pick, step, 0.0), 0.0, 1.0)
        if self.is_categorical is not None:
            out[:, self.is_categorical] = center[self.is_categorical]
        return out


def _is_tried(rows: np.ndarray, tried: np.ndarray | None) -> np.ndarray:
    """For each row of normalized points, whether it is a configuration in ``tried``."""
    if tried is None or not len(tried):
        return np.zeros(len(rows), dtype=bool)
    gap = np.abs(rows[:, None, :] - tried[None, :, :]).max(axis=2)
    return (gap <= SAME).any(axis=1)


def _paused(curves: list[Curve]) -> list[int]:
    return [i for i, c in enumerate(curves) if c.state == PAUSED and c.budget < 1.0 - 1e-9]
