"""Samplers and pruners by name, and cifarlab's GP sampler.

cifarlab's default sampler is Optuna's :class:`~optuna.samplers.GPSampler` (a Gaussian-process
surrogate of the objective, log expected improvement as the acquisition function, q-EI over
running trials so that parallel workers do not pile onto one point) with one addition: trials
that *failed* (NaN loss, out of memory, an exception) or were *pruned* are shown to the surrogate
as bad observations instead of being dropped. Plain GPSampler fits completed trials only, so a
region where training diverges looks unexplored, and expected improvement keeps sending trials
back into it. Here a failed trial counts as the worst completed value, and a pruned trial as the
last validation loss it reported, so the surrogate learns where not to go.

Six more departures, each measured in ``bench/bo_suite.py`` (docs/BENCHMARKS.md):

* **Trust region.** Every other model-guided trial is local: a GP fitted near the incumbent,
  searched in a box around it that shrinks where such steps fail (:mod:`.trustregion`); none
  for an objective declared noisy, whose best observation is often a lucky draw.
* **Prior mean.** The GP's zero sits at a poor quantile of the losses, not at their mean, so
  unexplored space is not predicted to be an average trial (:mod:`cifarlab.tune.priormean`).

* **Length-scale prior.** The kernel's length scales are fitted under a broader prior than
  Optuna's (:func:`log_prior`): a mixture of Optuna's, whose mode is the whole range of a
  parameter, and one whose mode is an eighth of it. Optuna's alone kept the sampler in one basin
  of multimodal functions and put a parameter on a bound of the box in about half of its
  suggestions.

* **Output warping.** Before the GP sees them, the losses are standardized and passed through a
  Yeo-Johnson power transform fitted by maximum likelihood (as HEBO does): a monotone map, so
  the minimum stays the minimum, that pulls in long tails (a diverged trial's loss 1000× the
  others') which would otherwise flatten the surrogate everywhere else.
* **Local candidates.** The acquisition optimizer also starts from the best perturbations of
  the incumbent (:meth:`FailureAwareGPSampler._optimize_acqf`), the observed point with the
  best *posterior mean*: 2,048 uniform samples rarely land in the narrow peaks of expected
  improvement next to a good point in 5-10 dimensions. The fitted noise does not tell noisy
  problems from rugged ones (about 1e-3 on noisy Hartmann6, 0.1 on Rastrigin6), so they stay
  on for both.
* **Recommendation.** For an objective declared noisy, :func:`recommend` returns the completed
  trial with the lowest *posterior mean*, not the lowest observation, which is often a lucky
  draw. For a deterministic one it returns the lowest observation: on rugged deterministic
  functions the posterior mean smooths the ruggedness away and picks worse points (measured:
  Levy10, Rastrigin6, Styblinski-Tang8).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna._gp import optim_mixed
from optuna.distributions import BaseDistribution
from optuna.samplers._gp import sampler as _gp_sampler
from optuna.trial import FrozenTrial, TrialState

from cifarlab.tune.priormean import PRIOR_MEAN_QUANTILE, sample_relative_impl
from cifarlab.tune.trustregion import SIDE_ATTR, is_local, narrow, perturb
from cifarlab.tune.warping import InputWarp, fit_input_warp, warp_observations, warp_values

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "FailureAwareGPSampler",
    "Surrogate",
    "fit_surrogate",
    "log_prior",
    "make_pruner",
    "make_sampler",
    "perturb",
    "rank_by_posterior_mean",
    "recommend",
    "warp_values",
]

FREEZE_THAW = "freeze-thaw"  # moves chosen by cifarlab.tune.mfstudy, not by a sampler
SAMPLERS = ("gp", "tpe", "random", FREEZE_THAW)
PRUNERS = ("none", "median", "asha", "hyperband")
IMPUTE_ATTR = "impute_as_worst"  # user attr set on trials that failed because of their params


def default_startup(n_trials: int | None) -> int:
    """Seeded random trials before the surrogate takes over: 10 (Optuna's default) for long
    studies, a quarter of the budget but at least 4 for short ones, so a 12-trial study still
    gets 8 model-guided trials."""
    if n_trials is None:
        return 10
    return max(4, min(10, n_trials // 4))


# The two modes of each length scale's prior, as fractions of its parameter's range (log_prior).
LENGTH_SCALE_MODES = (1.0, 0.125)


def log_prior(gpr: Any, modes: tuple[float, ...] = LENGTH_SCALE_MODES) -> Any:
    """The log prior of the GP's kernel parameters: Optuna's (``default_log_prior``: the same
    gamma priors on the kernel scale and the noise; a test checks that they agree), except that
    each length scale's prior is an even mixture of Optuna's term, -0.1·(a/x + x/a) in the
    inverse squared length scale x with a = 1 (mode: the whole range of the parameter), and
    the same term with its mode at 1/8 of the range (a = 64). Both terms are weak, so the
    mixture is broad: about flat from 1/8 of the range to all of it (highest near a third,
    where the two meet), and falling outside.

    Optuna's prior alone pulls every length scale towards the whole range: it smooths over
    basins narrower than the box and extrapolates trends into its faces. In bo_suite the
    sampler then stayed in one basin of the multimodal problems, and about half its suggestions
    had a parameter on a bound. A single short mode fixed that and lost the problems with a
    global trend (Levy10, Rosenbrock4, the failing region); the mixture kept most of both
    (docs/BENCHMARKS.md).
    """
    import torch

    def gamma(x: Any, concentration: float, rate: float) -> Any:
        return (concentration - 1) * torch.log(x) - rate * x

    x = gpr.inverse_squared_lengthscales
    terms = torch.stack([-(0.1 * a / x + 0.1 * x / a) for a in (1 / m**2 for m in modes)])
    return (torch.logsumexp(terms, 0).sum() + gamma(gpr.kernel_scale, 2, 1)
            + gamma(gpr.noise_var, 1.1, 30))


class FailureAwareGPSampler(optuna.samplers.GPSampler):
    """GPSampler whose surrogate also sees failed and pruned trials (see the module docstring).

    Its acquisition optimizer also starts local searches from the best of
    ``n_local_candidates`` perturbations of the incumbent (random subsets of the continuous
    parameters moved by 0.5-15% of their range, as TuRBO and HEBO perturb theirs), besides
    GPSampler's uniform samples: in 5-10 dimensions 2,048 uniform samples rarely land in the
    narrow peaks of expected improvement next to a good point.
    """

    n_local_candidates = 1024
    local_scales = (0.005, 0.02, 0.05, 0.15)
    input_warping = False  # Kumaraswamy warping of continuous inputs (cifarlab.tune.warping)
    startup_per_dimension = False  # at most d + 1 random trials for d parameters, as HEBO
    # the GP's prior mean at this percentile of the values (cifarlab.tune.priormean); None:
    # at their mean, as Optuna's GPSampler
    prior_mean_quantile: float | None = PRIOR_MEAN_QUANTILE
    trust_region = True  # every other model-guided trial is local (cifarlab.tune.trustregion)
    trust_centre = "observed"  # its box around the best observation, or "posterior" mean
    noisy = False  # declared noisy: no local steps (the best observation is often a lucky draw)
    reflect = False  # local candidates reflected at the box's faces instead of clipped onto them

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._log_prior = log_prior
        self._local_gprs: Any = None

    def _sample_relative_impl(self, study: optuna.Study, completed: list[FrozenTrial],
                              running: list[FrozenTrial],
                              search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if self.prior_mean_quantile is None:
            return super()._sample_relative_impl(study, completed, running, search_space)
        impl = sample_relative_impl(self.prior_mean_quantile)
        return impl(self, study, completed, running, search_space)

    def _optimize_acqf(self, acqf: Any, best_params: np.ndarray | None) -> np.ndarray:
        cont = acqf.search_space.continuous_indices
        if best_params is None or len(cont) == 0 or self.n_local_candidates <= 0:
            return super()._optimize_acqf(acqf, best_params)
        rng = self._rng.rng
        center = self._incumbent(best_params[0])
        starts = best_params if np.array_equal(center, best_params[0]) else np.vstack(
            [best_params, center[None, :]])
        cands = perturb(center, cont, self.n_local_candidates, self.local_scales, rng,
                        reflect=self.reflect)
        values = acqf.eval_acqf_no_grad(cands)
        room = max(0, self._n_local_search - 1 - len(starts))
        top = cands[np.argsort(values)[::-1][:min(3, room)]]
        normalized, _ = optim_mixed.optimize_acqf_mixed(
            acqf, warmstart_normalized_params_array=np.vstack([starts, top]),
            n_preliminary_samples=self._n_preliminary_samples,
            n_local_search=self._n_local_search, tol=self._tol, rng=rng)
        return normalized

    def _incumbent(self, best_observed: np.ndarray) -> np.ndarray:
        """The observed point with the best posterior mean under the GP just fitted: the centre
        of the local candidates. A noisy objective's best observation is often a lucky draw;
        where the fit found no noise the two coincide."""
        gprs = self._gprs_cache_list
        if not gprs or len(gprs) != 1:  # (one objective: the only kind cifarlab runs)
            return best_observed
        import torch

        x = gprs[0]._X_train
        with torch.no_grad():
            mean, _ = gprs[0].posterior(x)
        return x[int(torch.argmax(mean))].detach().cpu().numpy().astype(best_observed.dtype)

    def _fit_input_warp(self, observed: list[FrozenTrial],
                        search_space: dict[str, BaseDistribution]) -> InputWarp | None:
        from optuna._gp.search_space import SearchSpace as GPSpace

        x = GPSpace(search_space).get_normalized_params(observed)
        y = np.array([t.value for t in observed], dtype=float)
        y = (y - y.mean()) / max(float(y.std()), 1e-12)
        return fit_input_warp(x, y, search_space, deterministic=self._deterministic)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if search_space == {}:
            return {}
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL, TrialState.PRUNED)
        trials = study._get_trials(deepcopy=False, states=states, use_cache=False)
        maximize = study.directions == [optuna.study.StudyDirection.MAXIMIZE]
        observed = observations_for_surrogate(trials, search_space, maximize)
        running = [
            t for t in trials
            if t.state == TrialState.RUNNING
            and search_space.keys() <= _gp_sampler._get_params(t).keys()
        ]
        startup = self._n_startup_trials
        if self.startup_per_dimension:
            startup = min(startup, len(search_space) + 1)
        if len(observed) < startup:
            return {}
        region, local = search_space, (  # (an enqueued trial's parameters are fixed)
            self.trust_region and not (self.input_warping or self.noisy)
            and is_local(trial.number, startup)
            and "fixed_params" not in trial.system_attrs and len(study.directions) == 1)
        if local:
            fitted = (self._gprs_cache_list[0] if self.trust_centre == "posterior"
                      and self._gprs_cache_list else None)
            region, observed, side = narrow(trials, observed, search_space, fitted, maximize)
            study._storage.set_trial_system_attr(trial._trial_id, SIDE_ATTR, side)
        observed = warp_observations(observed)
        warp = self._fit_input_warp(observed, search_space) if self.input_warping else None
        if warp is not None:
            observed, running = warp.trials(observed), warp.trials(running)
        import torch

        # the local and the global GP each warm-start from their own last fit
        if local:
            self._gprs_cache_list, self._local_gprs = self._local_gprs, self._gprs_cache_list
        with torch.device("cpu"):
            params = self._sample_relative_impl(study, observed, running, region)
        if local:
            self._gprs_cache_list, self._local_gprs = self._local_gprs, self._gprs_cache_list
        if warp is not None and params:
            params = warp.unwarp(params)
        if params:
            # Share the choice with other processes, as GPSampler does: a worker that sees
            # this trial RUNNING reads its point from here to treat it as pending.
            text = json.dumps(params)
            size = _gp_sampler._SYSTEM_ATTR_MAX_LENGTH
            for i in range(0, len(text), size):
                study._storage.set_trial_system_attr(
                    trial._trial_id, f"{_gp_sampler._RELATIVE_PARAMS_KEY}:{i // size}",
                    text[i : i + size])
        return params


def observations_for_surrogate(
    trials: list[FrozenTrial], search_space: dict[str, BaseDistribution], maximize: bool = False
) -> list[FrozenTrial]:
    """Completed trials, plus failed and pruned ones rewritten as completed with an imputed value.

    Only trials whose parameters cover ``search_space`` take part. A failed trial is imputed
    only when the objective flagged it (:data:`IMPUTE_ATTR`): a trial lost to a dead worker or to
    Ctrl-C says nothing about its parameters. ``maximize``: the study maximises its value, so
    the worst is the lowest.
    """

    def covers(t: FrozenTrial) -> bool:
        return search_space.keys() <= t.params.keys()

    completed = [t for t in trials if t.state == TrialState.COMPLETE and covers(t)
                 and t.value is not None and math.isfinite(t.value)]
    if not completed:
        return completed
    worst = (min if maximize else max)(t.value for t in completed if t.value is not None)
    out = list(completed)
    for t in trials:
        if not covers(t):
            continue
        value: float | None = None
        if t.state == TrialState.FAIL and t.user_attrs.get(IMPUTE_ATTR):
            value = worst
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            value = (max if maximize else min)(last, worst) if math.isfinite(last) else worst
        if value is not None:
            out.append(optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=value,
                params={k: t.params[k] for k in search_space},
                distributions={k: t.distributions[k] for k in search_space}))
    return out


def recommend(study: optuna.Study, noisy: bool = False) -> FrozenTrial:
    """The completed trial the study recommends: with ``noisy``, the lowest GP posterior mean of
    the warped loss among completed trials (its best observation while the GP cannot be
    fitted); otherwise its best observation."""
    best = study.best_trial
    if not noisy:
        return best
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    ranked = rank_by_posterior_mean(study, done)
    return ranked[0] if ranked else best


def rank_by_posterior_mean(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """``trials`` ranked by the posterior mean of the GP fitted to ``study``'s warped losses,
    lowest first; only those that cover the GP's search space, and none while the GP cannot be
    fitted or fewer than 3 are covered."""
    surrogate = fit_surrogate(study, warp=True)
    if surrogate is None:
        return []
    covered = [t for t in trials if surrogate.search_space.keys() <= t.params.keys()]
    if len(covered) < 3:
        return []
    mean, _ = surrogate.predict([{k: t.params[k] for k in surrogate.search_space}
                                 for t in covered])
    return [covered[i] for i in np.argsort(mean, kind="stable")]


def make_sampler(name: str, seed: int | None, n_startup: int,
                 noisy: bool = False) -> optuna.samplers.BaseSampler:
    """``gp`` (cifarlab's failure-aware GP; ``noisy``: the objective is declared noisy, see
    :attr:`FailureAwareGPSampler.noisy`), ``tpe`` or ``random``, all seeded
    (``freeze-thaw``: see :mod:`cifarlab.tune.mfstudy`)."""
    if name == "gp":
        gp_sampler = FailureAwareGPSampler(
            seed=seed, n_startup_trials=n_startup,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False)
        gp_sampler.noisy = noisy
        return gp_sampler
    if name == "tpe":
        # constant_liar: running trials count as bad, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup,
                                          constant_liar=True)
    if name in ("random", FREEZE_THAW):
        # (a freeze-thaw study never asks its sampler: its moves are decided by
        # cifarlab.tune.freezethaw; this one only answers a stray study.ask())
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; valid samplers are {', '.join(SAMPLERS)}")


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Pruners act on per-epoch validation loss; steps are epochs, counted from 1."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs),
                                              reduction_factor=3)
    raise ValueError(f"unknown pruner {name!r}; valid pruners are {', '.join(PRUNERS)}")


@dataclass
class Surrogate:
    """The GP the sampler would fit right now, with predictions in objective units."""

    search_space: dict[str, BaseDistribution]
    observed: list[FrozenTrial]  # what the GP was fitted on (imputed trials included)
    _gp_space: Any
    _gpr: Any
    _y_mean: float
    _y_std: float

    def predict(self, points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of validation loss at ``points``."""
        import torch

        x = self._gp_space.get_normalized_params([None] * len(points), points)
        with torch.no_grad():
            mean, var = self._gpr.posterior(torch.from_numpy(x))
        return (mean.numpy() * self._y_std + self._y_mean,
                np.sqrt(var.numpy()) * self._y_std)


def fit_surrogate(study: optuna.Study, warp: bool = False) -> Surrogate | None:
    """Fit the sampler's GP (kernel, length-scale prior, data; its prior mean at the losses'
    mean, not the sampler's poor quantile: the same near the data) to ``study``; None with < 2
    points. With ``warp`` it is fitted to the warped losses, as the sampler's is, and predicts
    in warped units; without, in loss units (what the report plots)."""
    from optuna._gp import gp, prior
    from optuna._gp import search_space as gp_search_space
    from optuna.search_space import intersection_search_space

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(done) < 2:
        return None
    space = {k: d for k, d in intersection_search_space(done).items() if not d.single()}
    if not space:
        return None
    observed = observations_for_surrogate(trials, space)
    if warp:
        observed = warp_observations(observed)
    gp_space = gp_search_space.SearchSpace(space)
    x = gp_space.get_normalized_params(observed)
    y = np.array([t.value for t in observed], dtype=float)
    y_mean, y_std = float(y.mean()), float(max(y.std(), 1e-12))
    gpr = gp.fit_kernel_params(
        X=x, Y=(y - y_mean) / y_std, is_categorical=gp_space.is_categorical,
        log_prior=log_prior, minimum_noise=prior.DEFAULT_MINIMUM_NOISE_VAR,
        deterministic_objective=False)
    return Surrogate(space, observed, gp_space, gpr, y_mean, y_std)
