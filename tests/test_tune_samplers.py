"""Sampler tests in the style of Optuna's shared sampler tests (tests/samplers_tests/test_samplers.py):
every named sampler, every distribution type, bounds, seeding, pending and failed trials."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from cifarlab.tune.samplers import (
    IMPUTE_ATTR,
    PRUNERS,
    SAMPLERS,
    FailureAwareGPSampler,
    fit_surrogate,
    make_pruner,
    make_sampler,
    observations_for_surrogate,
)

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
    m = trial.suggest_float("m", 0.5, 0.9, step=0.1)
    n = trial.suggest_int("n", 1, 9, step=2)
    k = trial.suggest_int("k", 1, 64, log=True)
    c = trial.suggest_categorical("c", ["a", "b", 3])
    assert -3.0 <= x <= 3.0 and 1e-3 <= lr <= 1.0
    assert any(math.isclose(m, v) for v in (0.5, 0.6, 0.7, 0.8, 0.9))
    assert n in (1, 3, 5, 7, 9) and 1 <= k <= 64 and c in ("a", "b", 3)
    return x**2 + math.log10(lr) ** 2 + m + n / 10 + (c == "a")


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_distribution_stays_in_bounds(name):
    study = optuna.create_study(sampler=make_sampler(name, seed=0, n_startup=4))
    study.optimize(_objective, n_trials=12)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 12


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_sequence(name):
    def params(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(name, seed=seed, n_startup=4))
        study.optimize(_objective, n_trials=8)
        return [t.params for t in study.trials]

    assert params(3) == params(3)
    assert params(3) != params(4)


def test_gp_treats_running_trials_as_pending():
    """Two asks without a tell must not return the same point (q-EI over running trials)."""
    sampler = make_sampler("gp", seed=0, n_startup=5)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=8)
    a, b = study.ask(), study.ask()
    xa, xb = a.suggest_float("x", 0, 1), b.suggest_float("x", 0, 1)
    assert abs(xa - xb) > 1e-3


def _failing_region_study(sampler: optuna.samplers.BaseSampler) -> int:
    """Minimise (x - 0.75)^2 where training 'diverges' for x > 0.7: the optimum sits at the edge
    of a failing region. Returns how many model-guided trials were sent into it."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_float("y", 0.0, 1.0)
        if x > 0.7:
            trial.set_user_attr(IMPUTE_ATTR, True)
            raise FloatingPointError("loss became nan")
        return (x - 0.75) ** 2 + 0.1 * (y - 0.5) ** 2

    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=30, catch=(FloatingPointError,))
    return sum(1 for t in study.trials[6:] if t.state == TrialState.FAIL)


def test_failing_region_is_not_suggested_again_and_again():
    plain = _failing_region_study(optuna.samplers.GPSampler(seed=0, n_startup_trials=6))
    aware = _failing_region_study(FailureAwareGPSampler(seed=0, n_startup_trials=6))
    # plain GPSampler never sees its failures and keeps probing past x = 0.7
    assert plain >= 8, plain
    assert aware <= plain // 3, (aware, plain)


def test_failed_and_pruned_trials_are_imputed_for_the_surrogate():
    dist = optuna.distributions.FloatDistribution(0, 1)
    mk = optuna.trial.create_trial
    trials = [
        mk(state=TrialState.COMPLETE, value=1.0, params={"x": 0.1}, distributions={"x": dist}),
        mk(state=TrialState.COMPLETE, value=3.0, params={"x": 0.2}, distributions={"x": dist}),
        mk(state=TrialState.FAIL, params={"x": 0.9}, distributions={"x": dist},
           user_attrs={IMPUTE_ATTR: True}),
        mk(state=TrialState.FAIL, params={"x": 0.8}, distributions={"x": dist}),  # dead worker
        mk(state=TrialState.PRUNED, params={"x": 0.5}, distributions={"x": dist},
           intermediate_values={1: 2.5, 2: 2.0}),
    ]
    got = sorted((t.params["x"], t.value) for t in observations_for_surrogate(trials, {"x": dist}))
    assert got == [(0.1, 1.0), (0.2, 3.0), (0.5, 2.0), (0.9, 3.0)]


def test_surrogate_fits_the_observations():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=15)
    surrogate = fit_surrogate(study)
    assert surrogate is not None
    xs = [t.params["x"] for t in study.trials]
    mean, std = surrogate.predict([{"x": x} for x in xs])
    assert np.allclose(mean, [t.value for t in study.trials], atol=0.02)
    far_mean, _ = surrogate.predict([{"x": 0.3}, {"x": 0.95}])
    assert far_mean[0] < far_mean[1]
    assert (std >= 0).all()


@pytest.mark.parametrize("name", PRUNERS)
def test_pruners_by_name(name):
    pruner = make_pruner(name, max_epochs=3)
    assert isinstance(pruner, optuna.pruners.BasePruner)


def test_unknown_names():
    with pytest.raises(ValueError, match="valid samplers"):
        make_sampler("cmaes", 0, 4)
    with pytest.raises(ValueError, match="valid pruners"):
        make_pruner("wilcoxon", 3)


def test_output_warping_is_monotone_and_pulls_in_long_tails():
    from cifarlab.tune.warping import warp_values

    y = np.array([0.5, 0.6, 0.55, 0.7, 0.52, 900.0, 0.58])  # one diverged trial
    w = warp_values(y)
    assert np.array_equal(np.argsort(w), np.argsort(y))  # the order, so the minimum, is kept
    z = (y - y.mean()) / y.std()
    # the outlier no longer squeezes the good trials together: their spread grows
    good = y < 1
    assert w[good].std() / w.std() > 10 * z[good].std() / z.std()
    assert np.array_equal(warp_values(y[:3]), y[:3])  # too few to fit: unchanged


def test_recommendation_is_the_best_posterior_mean_under_noise():
    from cifarlab.tune.samplers import recommend

    rng = np.random.default_rng(0)

    def noisy(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        return x**2 + rng.normal(0, 0.15)

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(noisy, n_trials=40)
    rec = recommend(study, noisy=True)
    assert recommend(study) == study.best_trial  # a deterministic objective: its best value
    assert rec.state == TrialState.COMPLETE
    # the lucky draw need not be near the optimum; the posterior-mean choice is
    assert abs(rec.params["x"]) < 0.3
    assert abs(rec.params["x"]) <= abs(study.best_trial.params["x"]) + 0.05


def test_perturbations_move_only_the_named_dimensions_and_stay_in_the_box():
    from cifarlab.tune.samplers import perturb

    rng = np.random.RandomState(0)
    center = np.array([0.0, 0.3, 0.5, 0.7, 1.0])
    dims = np.array([0, 2, 4])
    x = perturb(center, dims, 500, (0.01, 0.1), rng)
    assert x.shape == (500, 5)
    assert np.all((x >= 0) & (x <= 1))
    assert np.array_equal(x[:, [1, 3]], np.tile(center[[1, 3]], (500, 1)))  # the others stay
    moved = (x[:, dims] != center[dims]).sum(axis=1)
    assert moved.max() == 3 and (moved >= 1).mean() > 0.6  # 1-3 dims each (a clip can undo one)
    assert np.abs(x[:, 2] - 0.5).max() < 0.6


def test_gp_sampler_with_local_candidates_suggests_valid_mixed_points():
    """The local candidates keep the incumbent's integers and categories: every suggestion is
    inside the space, and the study improves on its random start."""
    sampler = make_sampler("gp", 0, 5)
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        x = trial.suggest_float("x", -2, 2)
        n = trial.suggest_int("n", 1, 5)
        c = trial.suggest_categorical("c", ["a", "b"])
        assert -2 <= x <= 2 and 1 <= n <= 5 and c in ("a", "b")
        return (x - 0.3) ** 2 + (n - 4) ** 2 + (c == "b")

    study.optimize(objective, n_trials=20)
    first = min(t.value for t in study.trials[:5])
    assert study.best_value <= first and study.best_value < 0.5


def test_local_candidates_centre_on_the_best_posterior_mean_not_a_lucky_draw():
    """A noisy objective's best observation can be one lucky draw in a bad region; the local
    search starts from the observed point the GP believes best. Without noise the two agree."""
    x_dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    rng = np.random.default_rng(0)

    def fitted(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        sampler = make_sampler("gp", 0, 4)
        assert isinstance(sampler, FailureAwareGPSampler)
        sampler.trust_region = False  # (a local step would fit its GP near the lucky draw)
        study = optuna.create_study(sampler=sampler)
        for x, y in points:
            study.add_trial(optuna.trial.create_trial(params={"x": x},
                                                      distributions={"x": x_dist}, value=y))
        study.ask({"x": x_dist})  # fits the GP
        best = np.array([study.best_trial.params["x"]])
        return sampler._incumbent(best), best

    good = [(x, 0.0 + rng.normal(0, 0.1)) for x in np.linspace(0.1, 0.2, 10)]
    bad = [(x, 1.0 + rng.normal(0, 0.1)) for x in np.linspace(0.8, 0.9, 10)]
    centre, best = fitted(good + bad + [(0.85, -0.35)])  # one lucky draw among the bad
    assert best[0] == 0.85 and 0.1 <= centre[0] <= 0.2
    smooth = [(x, (x - 0.37) ** 2) for x in np.linspace(0.0, 1.0, 12)]
    centre, best = fitted(smooth)
    assert centre[0] == pytest.approx(best[0])


def test_reflected_perturbations_never_land_on_a_face_they_crossed():
    """Clipping puts every step that crosses a face of the box exactly on it; reflection
    mirrors it back inside, so a candidate sits on a bound only where the centre already was
    and that dimension did not move."""
    from cifarlab.tune.samplers import perturb

    center = np.array([0.02, 0.5, 0.98])
    dims = np.array([0, 1, 2])
    clipped = perturb(center, dims, 2000, (0.15,), np.random.RandomState(0))
    reflected = perturb(center, dims, 2000, (0.15,), np.random.RandomState(0), reflect=True)
    assert np.all((reflected >= 0) & (reflected <= 1))
    assert ((clipped == 0) | (clipped == 1)).sum() > 300
    assert ((reflected == 0) | (reflected == 1)).sum() == 0
    # the same steps: where clipping left a point inside, reflection leaves it where it was
    inside = (clipped > 0) & (clipped < 1)
    assert np.allclose(reflected[inside], clipped[inside])


def _gpr(length_scale: float, kernel_scale: float = 1.0, noise: float = 0.01):
    import torch
    from optuna._gp.gp import GPRegressor

    return GPRegressor(
        X_train=torch.rand(5, 2, dtype=torch.float64),
        y_train=torch.zeros(5, dtype=torch.float64),
        is_categorical=torch.zeros(2, dtype=torch.bool),
        inverse_squared_lengthscales=torch.full((2,), length_scale**-2.0, dtype=torch.float64),
        kernel_scale=torch.tensor(kernel_scale, dtype=torch.float64),
        noise_var=torch.tensor(noise, dtype=torch.float64))


def test_length_scale_prior_has_a_long_and_a_short_mode():
    """cifarlab's prior: each length scale's term is a mixture with one mode at the whole range
    (Optuna's) and one at 1/8 of it; with the long mode alone it is Optuna's prior exactly."""
    from optuna._gp.prior import default_log_prior

    from cifarlab.tune.samplers import LENGTH_SCALE_MODES, log_prior

    scales = np.geomspace(0.02, 3.0, 600)
    values = np.array([float(log_prior(_gpr(s))) for s in scales])
    peaks = scales[1:-1][(values[1:-1] > values[:-2]) & (values[1:-1] > values[2:])]
    assert sorted(LENGTH_SCALE_MODES) == [0.125, 1.0]
    # a peak near each mode (each one's tail moves the other a little), and one where the two
    # terms meet: the density is broad from 1/8 of the range to all of it
    assert [peaks.min(), peaks.max()] == pytest.approx([0.125, 1.0], rel=0.1)
    inside = values[(scales >= 0.125) & (scales <= 1.0)]
    assert inside.min() > values[0] + 1 and inside.min() > values[-1]
    for s, k, n in [(0.3, 1.0, 0.01), (1.7, 2.5, 0.2), (0.05, 0.4, 1e-4)]:
        g = _gpr(s, k, n)
        assert float(log_prior(g, modes=(1.0,))) == float(default_log_prior(g))


def test_the_gp_sampler_fits_with_cifarlabs_prior():
    from cifarlab.tune.samplers import log_prior

    assert make_sampler("gp", 0, 4)._log_prior is log_prior


@pytest.mark.parametrize("per_dimension, first_guided", [(False, 10), (True, 3)])
def test_startup_per_dimension_hands_over_after_d_plus_one_trials(per_dimension, first_guided):
    """With ``startup_per_dimension`` (a bo_suite candidate, HEBO's rule) a 2-parameter study
    starts fitting the GP after 3 random trials instead of the sampler's 10."""
    sampler = make_sampler("gp", seed=0, n_startup=10)
    assert isinstance(sampler, FailureAwareGPSampler)
    sampler.startup_per_dimension = per_dimension
    guided = []
    original = sampler._sample_relative_impl

    def spy(study, observed, running, space):  # type: ignore[no-untyped-def]
        guided.append(len(observed))
        return original(study, observed, running, space)

    sampler._sample_relative_impl = spy  # type: ignore[method-assign]
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2 + t.suggest_float("y", 0, 1),
                   n_trials=12)
    assert guided and guided[0] == first_guided


def test_standardize_at_quantile_puts_zero_at_that_quantile():
    from cifarlab.tune.priormean import standardize_at_quantile

    v = np.array([[-3.0], [-1.0], [0.0], [2.0], [7.0]])
    z, shift, scale = standardize_at_quantile(v, 25.0)
    assert shift[0] == np.percentile(v, 25) and scale[0] == pytest.approx(v.std())
    assert np.percentile(z, 25) == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    assert np.all(np.diff(z[:, 0]) > 0)  # monotone: the order of the values is kept


@pytest.mark.parametrize("quantile", [None, 25.0])
def test_the_gp_is_fitted_with_its_prior_mean_at_the_quantile(monkeypatch, quantile):
    """The GP the sampler fits sees values whose zero (its prior mean) is the quantile-th
    percentile of the maximising-sign values (None: their mean, as Optuna's), and Optuna's own
    standardization is left as it was for every other GPSampler."""
    from optuna.samplers._gp import sampler as gp_sampler

    original_standardize = gp_sampler._standardize_values
    fitted_y: list[np.ndarray] = []
    gp = gp_sampler.gp  # (the sampler module's own lazy handle on optuna._gp.gp)
    fit = gp.fit_kernel_params

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        fitted_y.append(np.asarray(kwargs["Y"]))
        return fit(*args, **kwargs)

    monkeypatch.setattr(gp, "fit_kernel_params", spy)
    sampler = make_sampler("gp", seed=0, n_startup=5)
    assert isinstance(sampler, FailureAwareGPSampler)
    sampler.prior_mean_quantile = quantile
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2 + t.suggest_float("y", 0, 1),
                   n_trials=8)
    assert len(fitted_y) == 3
    for y in fitted_y:
        centre = np.mean(y) if quantile is None else np.percentile(y, quantile)
        assert centre == pytest.approx(0.0, abs=1e-9) and y.std() == pytest.approx(1.0)
    assert gp_sampler._standardize_values is original_standardize
