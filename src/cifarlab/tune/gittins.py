"""What a training move is worth: expected improvement, and the Gittins index of a staged run.

A configuration is trained in stages, one rung at a time, and its loss at the target budget is
known only at the last one. After each stage the study may stop: a run that looks poor after a
ninth of its budget is not taken further. So a move that stops short of the target buys an
*option*: it pays for one stage and learns whether the rest is worth paying for. Expected
improvement per second of the whole run undervalues it (it assumes the run goes to the end
whatever it shows), and expected improvement per second of the stage alone overvalues it (it
assumes the stage alone reaches the target).

The rule that prices the option is the Gittins index of a box in Weitzman's Pandora's-box
problem (Weitzman 1979), the index that cost-aware Bayesian optimization uses for boxes opened
in one go (Xie et al. 2024, "Cost-aware Bayesian optimization via the Pandora's Box Gittins
index"). Here the box opens in stages. For a price ``lam`` per second, the value of a run is
the expected gain of the best stopping rule,

    V(lam) = E[ max(0, E[ ... max(0, EI(f | y_1..y_{k-1}) - lam c_k) ... | y_1] - lam c_2) ]
             - lam c_1,

where ``y_j`` is the loss the run reports at its j-th rung, ``f`` its loss at the target,
``c_j`` the seconds of stage j, and ``EI(f | ...)`` the expected improvement at the target once
those losses are seen. The index is the price at which the run is worth just what it costs,
``V(lam) = 0``. With one stage left it is ``EI / c``: the rule that finishes a run is unchanged.
The expectations are Gauss-Hermite sums over the losses the stages may report, from the joint
Gaussian posterior of (``y_1``, ..., ``y_{k-1}``, ``f``) of the learning-curve model.
"""

from __future__ import annotations

import numpy as np
import torch
from optuna._gp.acqf import standard_logei

__all__ = ["log_ei", "log_stage_index"]

_NODES = 16  # Gauss-Hermite nodes per stage: within 0.3% of the definition (10: 5%)
_Z, _W = np.polynomial.hermite_e.hermegauss(_NODES)
_W = _W / _W.sum()
_BISECTIONS = 40


def log_ei(mean: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
    """log E[max(best - Y, 0)] for Y ~ N(mean, sd^2) (minimization), stable far in the tail."""
    sd = np.maximum(np.asarray(sd, dtype=float), 1e-12)
    z = torch.from_numpy((best - np.asarray(mean, dtype=float)) / sd)
    return standard_logei(z).numpy() + np.log(sd)


def log_stage_index(mean: np.ndarray, cov: np.ndarray, best: float, costs: np.ndarray
                    ) -> np.ndarray:
    """log of the Gittins index (improvement per second) of runs with ``k`` stages left.

    ``mean`` (n, k) and ``cov`` (n, k, k): each run's joint Gaussian of the losses it would
    report at its next ``k - 1`` rungs (observation noise included) and, last, of its loss at
    the target. ``costs`` (n, k) or (k,): the seconds of each stage. ``best``: the loss to
    improve on at the target."""
    mean = np.atleast_2d(np.asarray(mean, dtype=float))
    n, k = mean.shape
    cov = np.asarray(cov, dtype=float).reshape(n, k, k)
    costs = np.broadcast_to(np.maximum(np.asarray(costs, dtype=float), 1e-12), (n, k))
    sd_f = np.sqrt(np.maximum(cov[:, -1, -1], 0.0))
    le = log_ei(mean[:, -1], sd_f, best)
    if k == 1:
        return le - np.log(costs[:, 0])
    # the losses as mean + L eps, eps standard normal: the target's conditional mean moves
    # with the stages' eps, its conditional sd is what no stage reveals
    scale = np.maximum(cov[:, -1, -1], 1e-12)[:, None, None]
    chol = np.linalg.cholesky(cov + np.eye(k)[None] * 1e-9 * scale)
    eps = np.stack([g.ravel() for g in np.meshgrid(*([_Z] * (k - 1)), indexing="ij")], axis=1)
    m_f = mean[:, -1, None] + chol[:, -1, :k - 1] @ eps.T  # (n, nodes^(k-1))
    s_f = np.broadcast_to(chol[:, -1, -1:], m_f.shape)
    le_after = log_ei(m_f.ravel(), s_f.ravel(), best).reshape(m_f.shape)
    # EI after the stages, relative to EI now: the index is EI now times t, t in
    # [1 / sum(costs), 1 / costs[0]] (go to the end whatever; the first stage reveals all)
    ratio = np.exp(np.clip(le_after - le[:, None], -700.0, 700.0)).reshape(
        (n,) + (_NODES,) * (k - 1))
    lo = -np.log(costs.sum(axis=1))
    hi = -np.log(costs[:, 0])
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        t = np.exp(mid)
        value = np.maximum(ratio - _expand(t * costs[:, -1], k - 1), 0.0)
        for j in range(k - 2, -1, -1):  # expectation over stage j+1's loss, then its price
            value = (value * _W).sum(axis=-1) - _expand(t * costs[:, j], j)
            if j > 0:
                value = np.maximum(value, 0.0)  # stop before stage j+1
        lo, hi = np.where(value > 0, mid, lo), np.where(value > 0, hi, mid)
    return le + 0.5 * (lo + hi)


def _expand(v: np.ndarray, dims: int) -> np.ndarray:
    return v.reshape((-1,) + (1,) * dims)

