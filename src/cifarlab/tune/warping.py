"""Input and output warping for the GP sampler.

Input warping: each continuous parameter passes through a Kumaraswamy CDF,
``w(u) = 1 - (1 - u**a)**b`` on its normalized coordinate ``u`` in [0, 1], with ``a`` and ``b``
fitted with the kernel by maximum marginal likelihood (Snoek et al. 2014; BoTorch's ``Warp``,
and HEBO's GP, whose log-normal prior on ``a`` and ``b`` is used here).

A stationary kernel assumes a loss changes as fast near one end of a range as near the other.
Training losses do not: near a learning rate's divergence edge the loss changes in a few percent
of the range, far from it hardly at all. A stationary GP fitted to that shortens every length
scale, and its variance grows quickly away from the data, which is where the box's bounds are.
The warp stretches the range where the loss moves and compresses the rest, so one length scale
fits both.

The warp is a bijection of [0, 1] onto itself per parameter, so the sampler runs unchanged in
the warped coordinates: :meth:`InputWarp.trials` rewrites the trials' parameters into them, and
:meth:`InputWarp.unwarp` maps the proposal back. Parameters with a step (integers, stepped
floats) and categorical ones stay as they are: their grid is the space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import optuna
from optuna._gp import prior
from optuna._gp.gp import GPRegressor
from optuna._gp.search_space import SearchSpace as GPSpace
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import yeojohnson  # at import: a worker pays it once, not in a decision

__all__ = ["InputWarp", "fit_input_warp", "kumaraswamy", "kumaraswamy_inverse",
           "warp_observations", "warp_values"]

EPS = 1e-6
LOG_CONCENTRATION_VAR = 0.75  # the prior on log a and log b: N(0, 0.75), as BoTorch and HEBO


def kumaraswamy(u: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The warp of normalized coordinates ``u`` (columns: one parameter each)."""
    u = np.clip(u, 0.0, 1.0)
    return np.clip(1 - (1 - u**a) ** b, 0.0, 1.0)


def kumaraswamy_inverse(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = np.clip(w, 0.0, 1.0)
    return np.clip((1 - (1 - w) ** (1 / b)) ** (1 / a), 0.0, 1.0)


@dataclass(frozen=True)
class InputWarp:
    """A fitted warp of ``space``'s parameters ``dims`` (indices into its normalized vector)."""

    space: dict[str, BaseDistribution]
    dims: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @cached_property
    def _gp_space(self) -> GPSpace:
        return GPSpace(self.space)

    def _map(self, params: dict[str, Any], forward: bool) -> dict[str, Any]:
        gp = self._gp_space
        u = gp.get_normalized_params([None], [params])[0]  # type: ignore[list-item]
        f = kumaraswamy if forward else kumaraswamy_inverse
        u[self.dims] = f(u[self.dims], self.a, self.b)
        out = dict(params)
        new = gp.get_unnormalized_param(u)
        for i, name in enumerate(self.space):
            if i in self.dims:
                d = self.space[name]
                out[name] = float(min(max(new[name], d.low), d.high))  # type: ignore[attr-defined]
        return out

    def warp(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._map(params, forward=True)

    def unwarp(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._map(params, forward=False)

    def trials(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """The same trials (finished or running) with their parameters in warped coordinates."""
        from optuna.samplers._gp.sampler import _get_params

        out = []
        for t in trials:
            params = _get_params(t)
            warped = self.warp({k: params[k] for k in self.space})
            out.append(optuna.trial.create_trial(
                state=t.state, values=t.values, params=warped, distributions=self.space))
        return out


def _kumaraswamy_torch(u: Any, a: Any, b: Any) -> Any:
    """:func:`kumaraswamy` with gradients that stay finite at u = 0 and u = 1 (the bounds,
    where a study's points often are)."""
    import torch

    ua = torch.where(u > 0, u.clamp_min(EPS) ** a, torch.zeros_like(u))
    rest = 1 - ua
    return 1 - torch.where(rest > 0, rest.clamp_min(EPS) ** b, torch.zeros_like(u))


def fit_input_warp(x: np.ndarray, y: np.ndarray, space: dict[str, BaseDistribution],
                   deterministic: bool = False) -> InputWarp | None:
    """Fit ``a`` and ``b`` of every continuous parameter, jointly with the GP's kernel (Matérn
    5/2 with ARD, Optuna's priors on its parameters), to normalized points ``x`` and
    standardized values ``y`` (larger is better or worse: the fit does not care). None when
    there is nothing to warp or the fit fails."""
    import scipy.optimize
    import torch

    gp = GPSpace(space)
    dims = np.array([i for i in gp.continuous_indices if not gp.is_categorical[i]], dtype=int)
    if len(dims) == 0 or len(x) < 3:
        return None
    d, k = x.shape[1], len(dims)
    X = torch.from_numpy(np.clip(x, 0.0, 1.0))
    Y = torch.from_numpy(np.asarray(y, dtype=float))
    cat = torch.from_numpy(gp.is_categorical)
    idx = torch.from_numpy(dims)
    floor = prior.DEFAULT_MINIMUM_NOISE_VAR

    def loss(raw: np.ndarray) -> tuple[float, np.ndarray]:
        r = torch.from_numpy(raw).requires_grad_(True)
        log_a, log_b = r[d + 2 : d + 2 + k], r[d + 2 + k :]
        Xw = X.clone()
        Xw[:, idx] = _kumaraswamy_torch(X[:, idx], torch.exp(log_a), torch.exp(log_b))
        # Optuna's own GP on the warped points: its marginal likelihood and priors
        gpr = GPRegressor(
            is_categorical=cat, X_train=Xw, y_train=Y,
            inverse_squared_lengthscales=torch.exp(r[:d]), kernel_scale=torch.exp(r[d]),
            noise_var=(torch.tensor(floor, dtype=torch.float64) if deterministic
                       else torch.exp(r[d + 1]) + floor))
        warp_prior = -(log_a.square().sum() + log_b.square().sum()) / (2 * LOG_CONCENTRATION_VAR)
        total = -gpr.marginal_log_likelihood() - prior.default_log_prior(gpr) - warp_prior
        total.backward()
        assert r.grad is not None
        return float(total.item()), r.grad.numpy().copy()

    start = np.concatenate([np.zeros(d), [0.0, math.log(1e-2)], np.zeros(2 * k)])
    bounds = [(-10, 10)] * (d + 2) + [(-2.5, 2.5)] * (2 * k)  # a, b in [0.08, 12]
    try:
        with torch.enable_grad():
            res = scipy.optimize.minimize(loss, start, jac=True, method="L-BFGS-B",
                                          bounds=bounds, options={"gtol": 1e-2})
    except (RuntimeError, ValueError):  # a Cholesky that failed: no warp this time
        return None
    if not np.all(np.isfinite(res.x)):
        return None
    a = np.exp(res.x[d + 2 : d + 2 + k])
    b = np.exp(res.x[d + 2 + k :])
    return InputWarp(dict(space), dims, a, b)


# Output warping: the losses pass through a power transform before the GP sees them (HEBO's
# Yeo-Johnson; the "Output warping" of cifarlab.tune.samplers).


def warp_values(values: np.ndarray) -> np.ndarray:
    """Standardize, then Yeo-Johnson with the maximum-likelihood lambda; values unchanged when
    there are too few or the fit fails. Monotone increasing, so minima stay minima."""
    y = np.asarray(values, dtype=float)
    if len(y) < 4 or not np.all(np.isfinite(y)) or y.std() == 0:
        return y
    z = (y - y.mean()) / y.std()
    try:
        with np.errstate(all="ignore"):
            warped, _ = yeojohnson(z)
    except (ValueError, FloatingPointError, OverflowError):
        return y
    warped = np.asarray(warped, dtype=float)
    if not np.all(np.isfinite(warped)) or warped.std() == 0:
        return y
    return warped


def warp_observations(observed: list[FrozenTrial]) -> list[FrozenTrial]:
    """The same trials with their values passed through :func:`warp_values`."""
    values = warp_values(np.array([t.value for t in observed], dtype=float))
    return [optuna.trial.create_trial(state=TrialState.COMPLETE, value=float(v), params=t.params,
                                      distributions=t.distributions)
            for t, v in zip(observed, values, strict=True)]
