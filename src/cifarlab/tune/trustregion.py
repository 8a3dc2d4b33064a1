"""Trust-region steps: a GP fitted near the incumbent and searched in a box around it.

One GP over the whole search space cannot resolve structure much narrower than its typical
spacing of observations: Ackley's ripples are 1/65 of its range, and a global fit smooths them
into a bowl whose bottom it then cannot find. TuRBO (Eriksson et al., NeurIPS 2019) fits the GP
inside a trust region instead and lets the region shrink where steps fail. cifarlab's sampler
interleaves the two: every other model-guided trial is *local* (the rest stay global, so a
study still leaves a poor basin).

A local step:

* takes a box around the incumbent (the best completed trial) whose side is a fraction of each
  float parameter's range, in its log scale when the parameter is log-scaled, and of each
  integer parameter's with more than four values; categoricals keep all their choices. The box
  is shifted, not cut, where it would leave the search space, so it keeps its volume;
* fits the sampler's GP to the observations inside the box (at least the 2·d nearest, counted
  in box widths outside it), with the box as the GP's search space, so its length scales are
  fitted to the local structure and its prior is relative to the box;
* maximises expected improvement inside the box.

The side follows TuRBO's rule on a shorter clock (a study here has tens of trials, not
thousands): it doubles after a local step that improved the best value (up to
:data:`SIDE_MAX`), halves after every second failure in a row, and starts again at
:data:`SIDE_START` when it falls below :data:`SIDE_MIN`. Each local trial records its side
(:data:`SIDE_ATTR`), so the schedule is read from the study itself: every worker, every storage
and a resumed study follow the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SIDE_ATTR", "SIDE_MAX", "SIDE_MIN", "SIDE_START", "box", "is_local", "narrow",
           "nearest", "next_side", "outside", "perturb", "posterior_centre"]

SIDE_ATTR = "cifarlab:trust_region_side"  # system attr of a local trial: its box's side
SIDE_START, SIDE_MAX, SIDE_MIN = 0.2, 0.8, 0.01  # fractions of each parameter's range
MIN_INT_VALUES = 5  # integer parameters with fewer values keep their whole range
IMPROVEMENT = 1e-3  # a step improves on the best by at least this fraction of its magnitude


def is_local(trial_number: int, n_startup: int, every: int = 2) -> bool:
    """Whether the trial is a local step: all model-guided trials but one in ``every``."""
    guided = trial_number - n_startup
    return every > 0 and guided >= 0 and guided % every != 0


def next_side(completed: Sequence[FrozenTrial], maximize: bool = False) -> float:
    """The side of the next local box, from the completed trials (in trial order) and the sides
    their local steps recorded."""
    local = [t for t in completed if SIDE_ATTR in t.system_attrs]
    if not local:
        return SIDE_START
    sign = -1.0 if maximize else 1.0  # losses: lower is better
    side = float(local[-1].system_attrs[SIDE_ATTR])
    failures = 0
    for step in reversed(local):
        before = [sign * t.value for t in completed
                  if t.number < step.number and t.value is not None]
        best = min(before) if before else math.inf
        if step.value is not None and sign * step.value < best - IMPROVEMENT * abs(best):
            break
        failures += 1
    if failures == 0:
        return min(2 * side, SIDE_MAX)
    if failures % 2 == 0:
        side /= 2
    return SIDE_START if side < SIDE_MIN else side


def _scaled(d: FloatDistribution | IntDistribution, value: float) -> float:
    return math.log(value) if d.log else float(value)


def _unscaled(d: FloatDistribution | IntDistribution, value: float) -> float:
    return math.exp(value) if d.log else value


def _window(d: FloatDistribution | IntDistribution, center: float, side: float
            ) -> tuple[float, float]:
    """The interval of ``side`` times the range (in the parameter's scale) around ``center``,
    shifted to lie inside the range, in parameter units."""
    lo, hi = _scaled(d, d.low), _scaled(d, d.high)
    width = side * (hi - lo)
    a = min(max(lo, _scaled(d, center) - width / 2), hi - width)
    return _unscaled(d, a), _unscaled(d, a + width)


def box(search_space: dict[str, BaseDistribution], center: dict[str, Any], side: float
        ) -> dict[str, BaseDistribution]:
    """The search space narrowed to a box of ``side`` around ``center`` (see the module)."""
    out: dict[str, BaseDistribution] = {}
    for name, d in search_space.items():
        if isinstance(d, FloatDistribution) and d.step is None and d.high > d.low:
            a, b = _window(d, center[name], side)
            out[name] = FloatDistribution(max(d.low, a), min(d.high, b), log=d.log)
        elif isinstance(d, IntDistribution) and (d.high - d.low) // d.step + 1 >= MIN_INT_VALUES:
            a, b = _window(d, center[name], side)
            low = d.low + max(0, math.floor((a - d.low) / d.step)) * d.step
            high = min(d.high, d.low + math.ceil((b - d.low) / d.step) * d.step)
            while high - low < 2 * d.step:  # at least three values
                low, high = max(d.low, low - d.step), min(d.high, high + d.step)
            out[name] = IntDistribution(low, high, log=d.log, step=d.step)
        else:
            out[name] = d
    return out


def outside(region: dict[str, BaseDistribution], full: dict[str, BaseDistribution],
            params: dict[str, Any]) -> float:
    """How far ``params`` lie outside ``region``: the largest distance over the narrowed
    parameters, in widths of the region (0 inside)."""
    far = 0.0
    for name, d in region.items():
        if d is full[name] or not isinstance(d, FloatDistribution | IntDistribution):
            continue
        lo, hi = _scaled(d, d.low), _scaled(d, d.high)
        x = _scaled(d, params[name])
        far = max(far, max(lo - x, x - hi, 0.0) / max(hi - lo, 1e-300))
    return far


def nearest(observed: list[FrozenTrial], region: dict[str, BaseDistribution],
            full: dict[str, BaseDistribution]) -> list[FrozenTrial]:
    """The observations inside ``region``, or the ``2·d`` nearest to it if fewer are."""
    far = [outside(region, full, t.params) for t in observed]
    order = sorted(range(len(observed)), key=far.__getitem__)
    inside = [observed[i] for i in order if far[i] == 0.0]
    return inside if len(inside) >= 2 * len(full) else [observed[i] for i in order[:2 * len(full)]]


def posterior_centre(completed: list[FrozenTrial], values: np.ndarray,
                     search_space: dict[str, BaseDistribution], fitted: Any) -> FrozenTrial:
    """The completed trial with the lowest posterior mean of ``values`` (the trials' losses, as
    the GP sees them) under the kernel of ``fitted``, the last global GP, conditioned on every
    completed trial: a noisy objective's best observation is often a lucky draw. The best
    observation when there is no fitted GP of this search space."""
    best = completed[int(np.argmin(values))]
    if fitted is None or len(completed) < 3 or np.std(values) == 0:
        return best
    import torch
    from optuna._gp.gp import GPRegressor
    from optuna._gp.search_space import SearchSpace as GPSpace

    space = GPSpace(search_space)
    x = torch.from_numpy(space.get_normalized_params(completed))
    if x.shape[1] != len(fitted.inverse_squared_lengthscales):
        return best
    y = torch.from_numpy(-(values - values.mean()) / values.std())  # maximising sign
    gpr = GPRegressor(torch.from_numpy(space.is_categorical), x, y,
                      fitted.inverse_squared_lengthscales, fitted.kernel_scale, fitted.noise_var)
    gpr._cache_matrix()
    with torch.no_grad():
        mean, _ = gpr.posterior(x)
    return completed[int(torch.argmax(mean))]


def narrow(trials: Sequence[FrozenTrial], observed: list[FrozenTrial],
           search_space: dict[str, BaseDistribution], fitted: Any = None,
           maximize: bool = False
           ) -> tuple[dict[str, BaseDistribution], list[FrozenTrial], float]:
    """A local step's search space, the observations its GP is fitted to, and its side:
    ``trials`` are the study's (in trial order), ``observed`` what the global GP would see;
    with ``fitted`` (the last global GP) the box is centred on the best posterior mean
    (:func:`posterior_centre`), else on the best observation (the highest with ``maximize``).
    """
    completed = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                 and math.isfinite(t.value) and search_space.keys() <= t.params.keys()]
    side = next_side(completed, maximize)
    values = np.array([float(t.value or 0.0) for t in completed]) * (-1.0 if maximize else 1.0)
    centre = posterior_centre(completed, values, search_space, fitted)
    region = box(search_space, centre.params, side)
    return region, nearest(observed, region, search_space), side


def perturb(center: np.ndarray, dims: np.ndarray, n: int, scales: tuple[float, ...],
            rng: np.random.RandomState, reflect: bool = False) -> np.ndarray:
    """``n`` copies of the normalized point ``center``, each with a random non-empty subset of
    ``dims`` moved by Gaussian steps of one of ``scales`` (fractions of the range), clipped to
    the unit box, or with ``reflect`` mirrored back into it at the face they crossed (clipping
    puts every step that crosses a face exactly on it)."""
    out = np.repeat(center[None, :], n, axis=0)
    k = len(dims)
    sizes = rng.randint(1, k + 1, size=n)
    chosen = rng.random_sample((n, k)).argsort(axis=1) < sizes[:, None]  # that many dims each
    step = rng.standard_normal((n, k)) * np.asarray(scales)[rng.randint(len(scales), size=n)][:, None]
    moved = out[:, dims] + np.where(chosen, step, 0.0)
    if reflect:
        moved = np.mod(moved, 2.0)
        moved = np.where(moved > 1.0, 2.0 - moved, moved)
    out[:, dims] = np.clip(moved, 0.0, 1.0)
    return out
