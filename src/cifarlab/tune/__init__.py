"""Bayesian optimization of training hyperparameters (``cifarlab tune``), built on Optuna.

The only package that imports optuna. The objective is a validation loss from
:func:`cifarlab.trainer.train` (by default at its calibrated temperature). Modules, in import
order:

* :mod:`.metric`: what a study minimises (calibrated or plain cross-entropy, or error);
* :mod:`.space`: search spaces and fidelity (files, checks, the built-in space);
* :mod:`.samplers`: the failure-aware GP sampler, peers and pruners;
* :mod:`.curves`, :mod:`.freezethaw`: the learning-curve GP, and the cost-aware decision to
  start a configuration or continue a paused one (multi-fidelity);
* :mod:`.storage`: where a study lives (SQLite, PostgreSQL) and what it stores;
* :mod:`.target`: the baseline and the search's best at the target budget, and the answer;
* :mod:`.summary`: the live table, the summary, the best configuration to retrain;
* :mod:`.interrupt`, :mod:`.objective`: Ctrl-C, and one trial's training;
* :mod:`.workers`: create or join a study and run its workers;
* :mod:`.report`: plots.
"""

from cifarlab.tune.samplers import (
    PRUNERS,
    SAMPLERS,
    FailureAwareGPSampler,
    make_pruner,
    make_sampler,
)
from cifarlab.tune.space import Fidelity, Param, SearchSpace, default_space, load_space
from cifarlab.tune.storage import StudyRef, TuneSettings, open_study
from cifarlab.tune.summary import best_config, retrain_config, summarize
from cifarlab.tune.workers import run_study

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
    "retrain_config",
    "run_study",
    "summarize",
]
