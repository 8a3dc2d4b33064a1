"""Bayesian optimization of training hyperparameters (``cifarlab tune``), built on Optuna.

The only package that imports optuna. The objective is validation loss from
:func:`cifarlab.train.train`; see :mod:`.samplers` for the surrogate and :mod:`.study` for
storage, workers and failures.
"""

from cifarlab.tune.samplers import (
    PRUNERS,
    SAMPLERS,
    FailureAwareGPSampler,
    make_pruner,
    make_sampler,
)
from cifarlab.tune.space import Fidelity, Param, SearchSpace, default_space, load_space
from cifarlab.tune.study import (
    StudyRef,
    TuneSettings,
    best_config,
    open_study,
    run_study,
    summarize,
)

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "FailureAwareGPSampler",
    "Fidelity",
    "Param",
    "SearchSpace",
    "StudyRef",
    "TuneSettings",
    "best_config",
    "default_space",
    "load_space",
    "make_pruner",
    "make_sampler",
    "open_study",
    "run_study",
    "summarize",
]
