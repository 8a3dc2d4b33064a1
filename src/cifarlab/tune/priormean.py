"""Where the GP's prior mean sits: at a poor quantile of what was observed, not at the average.

Optuna's GPSampler standardizes the objective values to mean 0 and fits a zero-mean GP, so far
from every observation the surrogate predicts the *average* trial, with its full prior variance.
Expected improvement then finds its largest values where nothing was measured: the corners and
faces of the box. In bo_suite 35% of the sampler's suggestions had a parameter exactly on a
bound; on Rosenbrock4, whose values grow by orders of magnitude towards the faces, 42-45% of its
model-guided trials did (two seeds, 2026-11-27).

Here the values are shifted so that zero is their :data:`PRIOR_MEAN_QUANTILE`-th percentile in
the sampler's maximising sign, the loss that a quarter of the trials did worse than: unexplored
space is assumed to be no better than a poor trial, and exploration has to earn its way by
variance near good points rather than by distance from all of them. The scale (the standard
deviation) is unchanged, and near the data, where the observations dominate, the posterior
moves little. Measured in bench/bo_suite.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from optuna._gp import gp
from optuna.samplers import GPSampler
from optuna.samplers._gp import sampler as _gp_sampler

__all__ = ["PRIOR_MEAN_QUANTILE", "sample_relative_impl", "standardize_at_quantile"]

PRIOR_MEAN_QUANTILE = 25.0


def standardize_at_quantile(values: np.ndarray, quantile: float = PRIOR_MEAN_QUANTILE
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values - their quantile-th percentile) / their std``, per column, as Optuna's
    ``_standardize_values`` returns it (standardized values, shift, scale); values are in the
    maximising sign, so a low percentile is a poor value."""
    clipped = gp.warn_and_convert_inf(values)
    shift = np.percentile(clipped, quantile, axis=0)
    scale = np.std(clipped, axis=0)
    return (clipped - shift) / np.maximum(_gp_sampler.EPS, scale), shift, scale


@functools.cache
def sample_relative_impl(quantile: float) -> Callable[..., Any]:
    """GPSampler's ``_sample_relative_impl`` with :func:`standardize_at_quantile` in place of
    its standardization: the same code object, run with a copy of its module's globals in which
    that one name is rebound. Nothing global is patched, so Optuna's own GPSampler, in this
    thread or another, keeps its behaviour."""
    impl = GPSampler._sample_relative_impl
    names = dict(vars(_gp_sampler))
    names["_standardize_values"] = functools.partial(standardize_at_quantile, quantile=quantile)
    return types.FunctionType(impl.__code__, names, impl.__name__, impl.__defaults__,
                              impl.__closure__)
