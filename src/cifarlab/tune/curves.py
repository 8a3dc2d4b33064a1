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

__all__ = ["CurveModel", "DecayCurveModel", "budget_coordinate", "fit_curves",
           "fit_decay_curves"]


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

    def joint(self, x: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The joint posterior of each configuration's loss at several budgets: rows ``x``
        (n, d) and ``budgets`` (n, k) -> mean (n, k) and covariance (n, k, k) of the noise-free
        loss, in loss units."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        s = budget_coordinate(np.asarray(budgets, dtype=float).reshape(len(x), -1),
                              self.min_budget)
        k = s.shape[1]
        z = torch.from_numpy(np.stack([np.column_stack([x, s[:, j]]) for j in range(k)], 1))
        with torch.no_grad():
            mean, cov = self._gpr.posterior(z, joint=True)
        m = (mean.numpy().reshape(len(x), k) + self._intercept + self._slope * s) * self._y_std
        return m + self._y_mean, cov.numpy().reshape(len(x), k, k) * self._y_std**2

    @property
    def noise_var(self) -> float:
        """The variance of a reported loss around the model's curve, in loss units squared."""
        return float(self._gpr.noise_var) * self._y_std**2

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


# --------------------------------------------------------------------------------------------
# The alternative: a product kernel with a freeze-thaw budget kernel


_SQRT5 = math.sqrt(5.0)


def _matern52(x1: torch.Tensor, x2: torch.Tensor, inv_sq_ls: torch.Tensor,
              is_categorical: torch.Tensor) -> torch.Tensor:
    diff = x1[:, None, :] - x2[None, :, :]
    sq = torch.where(is_categorical, (diff != 0).to(diff.dtype), diff**2)
    r = torch.sqrt((sq * inv_sq_ls).sum(-1) + 1e-12)
    return (1 + _SQRT5 * r + 5.0 / 3.0 * r**2) * torch.exp(-_SQRT5 * r)


def _decay(t1: torch.Tensor, t2: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
           beta: torch.Tensor) -> torch.Tensor:
    """Freeze-thaw's budget kernel (Swersky et al. 2014, a mixture of exponential decays),
    normalized to 1 at t = t' = 0, plus a share ``w`` that does not decay (the asymptote)."""
    return w + (1 - w) * (beta / (t1[:, None] + t2[None, :] + beta)) ** alpha


@dataclass
class DecayCurveModel:
    """A GP with kernel ``scale * Matern52(x, x') * (w + (1 - w) * (beta / (t + t' + beta))^alpha)``
    over hyperparameters ``x`` and budget ``t``: the product kernel of #14, whose budget factor
    says that points of a curve grow more alike as training goes on, and converge."""

    min_budget: float
    params: np.ndarray  # unconstrained: log inv_sq_ls (d), log scale, logit w, log alpha,
    #                     log beta, log noise
    is_categorical: np.ndarray
    _x: torch.Tensor
    _t: torch.Tensor
    _chol: torch.Tensor
    _alpha_vec: torch.Tensor
    _y_mean: float
    _y_std: float
    _slope: float
    _intercept: float

    def predict(self, x: np.ndarray, budget: np.ndarray | float = 1.0
                ) -> tuple[np.ndarray, np.ndarray]:
        x = np.atleast_2d(np.asarray(x, dtype=float))
        b = np.broadcast_to(np.asarray(budget, dtype=float), (len(x),))
        s = budget_coordinate(b, self.min_budget)
        xq, tq = torch.from_numpy(x), torch.from_numpy(np.clip(b, self.min_budget, 1.0))
        with torch.no_grad():
            k = _kernel(self.params, self.is_categorical, xq, tq, self._x, self._t, noise=False)
            mean = k @ self._alpha_vec
            v = torch.linalg.solve_triangular(self._chol, k.T, upper=False)
            prior_var = _kernel_diag(self.params, tq)
            var = (prior_var - (v**2).sum(0)).clamp_min(0.0)
        trend = self._intercept + self._slope * s
        m = (mean.numpy() + trend) * self._y_std + self._y_mean
        return m, np.sqrt(var.numpy()) * self._y_std


def _unpack(p: torch.Tensor, d: int) -> tuple[torch.Tensor, ...]:
    inv_sq_ls = torch.exp(p[:d])
    scale, w = torch.exp(p[d]), torch.sigmoid(p[d + 1])
    alpha, beta, noise = torch.exp(p[d + 2]), torch.exp(p[d + 3]), torch.exp(p[d + 4]) + 1e-6
    return inv_sq_ls, scale, w, alpha, beta, noise


def _kernel(p: np.ndarray | torch.Tensor, cats: np.ndarray, x1: torch.Tensor, t1: torch.Tensor,
            x2: torch.Tensor, t2: torch.Tensor, noise: bool) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    inv_sq_ls, scale, w, alpha, beta, nv = _unpack(p, x1.shape[1])
    k = scale * _matern52(x1, x2, inv_sq_ls, torch.from_numpy(cats)) * _decay(
        t1, t2, w, alpha, beta)
    return k + nv * torch.eye(len(x1), dtype=k.dtype) if noise else k


def _kernel_diag(p: np.ndarray | torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    d = len(p) - 5
    _, scale, w, alpha, beta, _ = _unpack(p, d)
    return scale * (w + (1 - w) * (beta / (2 * t + beta)) ** alpha)


def _neg_log_posterior(p: torch.Tensor, cats: np.ndarray, x: torch.Tensor, t: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    inv_sq_ls, scale, _, _, _, noise = _unpack(p, d)
    k = _kernel(p, cats, x, t, x, t, noise=True)
    chol = torch.linalg.cholesky(k)
    a = torch.cholesky_solve(y[:, None], chol)[:, 0]
    loglik = -0.5 * y @ a - torch.log(torch.diagonal(chol)).sum()
    # Optuna's priors for the shared parts; weak log-normal ones for the budget kernel's
    log_prior = (-(0.1 / inv_sq_ls + 0.1 * inv_sq_ls).sum() + (torch.log(scale) - scale)
                 + (0.1 * torch.log(noise) - 30 * noise)
                 - 0.5 * (p[d + 2] ** 2 + p[d + 3] ** 2 + p[d + 1] ** 2))
    return -(loglik + log_prior)


def fit_decay_curves(x: np.ndarray, budget: np.ndarray, y: np.ndarray, min_budget: float,
                     is_categorical: np.ndarray | None = None,
                     warm: DecayCurveModel | None = None) -> DecayCurveModel | None:
    """:func:`fit_curves` with the product kernel (same inputs, same mean line in ``s``)."""
    from scipy.optimize import minimize

    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    b = np.clip(np.asarray(budget, dtype=float)[keep], min_budget, 1.0)
    if len(y) < 3:
        return None
    d = x.shape[1]
    s = budget_coordinate(b, min_budget)
    y_mean, y_std = float(y.mean()), float(max(y.std(), 1e-12))
    z = (y - y_mean) / y_std
    slope, intercept = np.polyfit(s, z, 1) if np.ptp(s) > 0 else (0.0, 0.0)
    resid = torch.from_numpy(z - (intercept + slope * s))
    cats = (np.zeros(d, dtype=bool) if is_categorical is None
            else np.asarray(is_categorical, dtype=bool))
    xt, tt = torch.from_numpy(x), torch.from_numpy(b)
    start = (warm.params if warm is not None and len(warm.params) == d + 5
             else np.r_[np.zeros(d), 0.0, 0.0, 0.0, math.log(0.5), math.log(1e-2)])

    def f(v: np.ndarray) -> tuple[float, np.ndarray]:
        p = torch.from_numpy(v).requires_grad_(True)
        try:
            loss = _neg_log_posterior(p, cats, xt, tt, resid)
        except torch.linalg.LinAlgError:
            return 1e10, np.zeros_like(v)
        (g,) = torch.autograd.grad(loss, p)
        return float(loss.detach()), g.numpy()

    res = minimize(f, start, jac=True, method="L-BFGS-B",
                   bounds=[(-10, 10)] * d + [(-6, 6), (-6, 6), (-4, 4), (-6, 4), (-14, 0)],
                   options={"maxiter": 200})
    params = res.x
    with torch.no_grad():
        k = _kernel(params, cats, xt, tt, xt, tt, noise=True)
        chol = torch.linalg.cholesky(k)
        alpha_vec = torch.cholesky_solve(resid[:, None], chol)[:, 0]
    return DecayCurveModel(min_budget, params, cats, xt, tt, chol, alpha_vec, y_mean, y_std,
                           float(slope), float(intercept))
