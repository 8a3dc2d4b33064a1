"""A surrogate of learning curves: validation loss as a function of (hyperparameters, budget).

Each observation is one reported point of one trial's curve: its hyperparameters ``x`` (normalized
to the unit box, as Optuna's GP normalizes them), the budget it had consumed when it reported
(a fraction of the target budget, in (0, 1]) and the loss. Every reported point of every trial
takes part: completed, paused, pruned and running trials alike. Nothing is imputed: an early loss
is an early loss, and the model says what it implies at the target.

The model is a GP over the joint input ``(x, s)`` with ``s = 1 + log(budget) / log(1 /
min_budget)``, so that ``s`` runs from 0 at the smallest budget to 1 at the target and each
tripling of the budget moves it by the same step. Its kernel is Optuna's Matern-5/2 with one
length scale per input (``s`` included), fitted by maximum marginal likelihood under Optuna's
priors. Because the kernel is joint, curves of different configurations may cross: the model
learns from the data how far a ranking at a small budget carries to the target (the ``s`` length
scale). On top of it, a **mean that falls with budget**: a least-squares line in ``s`` fitted to
all points before the GP sees the residuals, so that an unexplored configuration at the target
is predicted at the typical target loss, not at the average over all budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from optuna._gp import gp, prior

__all__ = ["CurveModel", "budget_coordinate", "fit_curves"]


def budget_coordinate(budget: np.ndarray, min_budget: float) -> np.ndarray:
    """``s`` in [0, 1]: 0 at ``min_budget``, 1 at the target (budget 1), log-spaced between."""
    b = np.clip(np.asarray(budget, dtype=float), min_budget, 1.0)
    if min_budget >= 1.0:
        return np.ones_like(b)
    return 1.0 + np.log(b) / math.log(1.0 / min_budget)


@dataclass
class CurveModel:
    """A fitted learning-curve GP; :meth:`predict` answers in loss units."""

    min_budget: float
    n_params: int
    _gpr: gp.GPRegressor
    _y_mean: float
    _y_std: float
    _slope: float  # of the standardized mean line in s
    _intercept: float

    def predict(self, x: np.ndarray, budget: np.ndarray | float = 1.0
                ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the loss of configurations ``x`` (rows,
        normalized) after ``budget`` (a fraction of the target; a scalar applies to all)."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        b = np.broadcast_to(np.asarray(budget, dtype=float), (len(x),))
        s = budget_coordinate(b, self.min_budget)
        z = torch.from_numpy(np.column_stack([x, s]))
        with torch.no_grad():
            mean, var = self._gpr.posterior(z)
        trend = self._intercept + self._slope * s
        m = (mean.numpy() + trend) * self._y_std + self._y_mean
        sd = np.sqrt(np.clip(var.numpy(), 0.0, None)) * self._y_std
        return m, sd

    @property
    def budget_length_scale(self) -> float:
        """How far along ``s`` (0 = smallest budget, 1 = target) a ranking carries."""
        return float(self._gpr.length_scales[-1])


def fit_curves(x: np.ndarray, budget: np.ndarray, y: np.ndarray, min_budget: float,
               is_categorical: np.ndarray | None = None,
               warm: CurveModel | None = None) -> CurveModel | None:
    """Fit the curve model to observations (rows of ``x``, their ``budget`` and loss ``y``).

    Non-finite losses are dropped (a diverged point says its configuration is bad; the caller
    decides how to count it). None with fewer than 3 finite points. ``warm`` starts the kernel
    fit from an earlier model's parameters, which makes a refit after one more point cheap.
    """
    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    b = np.asarray(budget, dtype=float)[keep]
    if len(y) < 3:
        return None
    s = budget_coordinate(b, min_budget)
    y_mean, y_std = float(y.mean()), float(max(y.std(), 1e-12))
    z = (y - y_mean) / y_std
    if np.ptp(s) > 0:
        slope, intercept = np.polyfit(s, z, 1)
    else:
        slope, intercept = 0.0, 0.0
    resid = z - (intercept + slope * s)
    cats = np.zeros(x.shape[1], dtype=bool) if is_categorical is None else np.asarray(
        is_categorical, dtype=bool)
    gpr = gp.fit_kernel_params(
        X=np.column_stack([x, s]), Y=resid, is_categorical=np.append(cats, False),
        log_prior=prior.default_log_prior, minimum_noise=prior.DEFAULT_MINIMUM_NOISE_VAR,
        deterministic_objective=False, gpr_cache=None if warm is None else warm._gpr)
    return CurveModel(min_budget, x.shape[1], gpr, y_mean, y_std, float(slope),
                      float(intercept))
