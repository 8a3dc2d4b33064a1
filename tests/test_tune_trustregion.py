"""The GP sampler's trust-region steps (cifarlab.tune.trustregion): the box, its schedule, and
the local trials of a real study on real storage."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from cifarlab.tune import trustregion as tr
from cifarlab.tune.samplers import FailureAwareGPSampler, make_sampler

optuna.logging.set_verbosity(optuna.logging.ERROR)

SPACE = {"x": FloatDistribution(-5.0, 5.0), "lr": FloatDistribution(1e-4, 1.0, log=True),
         "n": IntDistribution(0, 10), "k": IntDistribution(1, 3),
         "c": CategoricalDistribution(["a", "b"])}


def test_box_is_a_fraction_of_each_range_around_the_centre_shifted_inside():
    region = tr.box(SPACE, {"x": 0.0, "lr": 1e-2, "n": 5, "k": 2, "c": "a"}, 0.2)
    x, lr, n = region["x"], region["lr"], region["n"]
    assert isinstance(x, FloatDistribution) and (x.low, x.high) == pytest.approx((-1.0, 1.0))
    assert isinstance(lr, FloatDistribution) and lr.log  # narrowed in its log scale
    assert math.log(lr.high / lr.low) == pytest.approx(0.2 * math.log(1e4))
    assert math.sqrt(lr.low * lr.high) == pytest.approx(1e-2)
    assert isinstance(n, IntDistribution) and n.low <= 5 <= n.high and n.high - n.low >= 2
    assert region["k"] is SPACE["k"] and region["c"] is SPACE["c"]  # too few values / choices

    edge = tr.box(SPACE, {"x": 4.9, "lr": 1e-4, "n": 10, "k": 1, "c": "b"}, 0.2)
    assert (edge["x"].low, edge["x"].high) == pytest.approx((3.0, 5.0))  # shifted, same width
    assert edge["lr"].low == pytest.approx(1e-4)
    assert (edge["n"].low, edge["n"].high) == (8, 10)


def _trial(number: int, value: float, side: float | None = None) -> optuna.trial.FrozenTrial:
    t = create_trial(state=TrialState.COMPLETE, value=value, params={"x": 0.0},
                     distributions={"x": SPACE["x"]},
                     system_attrs={} if side is None else {tr.SIDE_ATTR: side})
    t.number = number
    return t


def test_side_doubles_after_a_success_and_halves_after_every_second_failure():
    start = [_trial(i, 10.0 - i) for i in range(4)]  # best so far 7.0
    assert tr.next_side(start) == tr.SIDE_START
    assert tr.next_side([*start, _trial(4, 5.0, 0.2)]) == pytest.approx(0.4)
    one_fail = [*start, _trial(4, 8.0, 0.2)]
    assert tr.next_side(one_fail) == pytest.approx(0.2)
    two_fails = [*one_fail, _trial(5, 9.0, 0.2)]
    assert tr.next_side(two_fails) == pytest.approx(0.1)
    assert tr.next_side([*two_fails, _trial(6, 9.0, 0.1)]) == pytest.approx(0.1)
    assert tr.next_side([*start, _trial(4, 5.0, 0.6)]) == tr.SIDE_MAX
    # below the smallest side the region starts again
    assert tr.next_side([*start, _trial(4, 9.0, 0.012), _trial(5, 9.0, 0.012)]) == tr.SIDE_START


def test_every_other_guided_trial_is_local():
    assert [tr.is_local(n, 4) for n in range(3, 9)] == [False, False, True, False, True, False]


def _ripples(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -5.0, 5.0)
    y = trial.suggest_float("y", 1e-3, 1.0, log=True)
    n = trial.suggest_int("n", 0, 10)
    return x**2 + math.log10(y) ** 2 + (n - 3) ** 2 - math.cos(8 * x)


def test_local_trials_record_their_side_and_lie_in_the_box_around_the_incumbent(tmp_path):
    """On SQLite storage, through a second sampler that continues the study (as another worker
    or a resumed study does): every local trial lies in the box of its recorded side around the
    best trial before it, and the side it recorded is the one the study's history gives."""
    storage = f"sqlite:///{tmp_path / 'tr.db'}"
    study = optuna.create_study(storage=storage, sampler=make_sampler("gp", 0, 5))
    study.optimize(_ripples, n_trials=12)
    study = optuna.load_study(study_name=study.study_name, storage=storage,
                              sampler=make_sampler("gp", 1, 5))
    study.optimize(_ripples, n_trials=8)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    space = trials[0].distributions
    local = [t for t in trials if tr.SIDE_ATTR in t.system_attrs]
    assert [t.number for t in local] == [n for n in range(20) if tr.is_local(n, 5)]
    for t in local:
        before = [u for u in trials if u.number < t.number]
        assert t.system_attrs[tr.SIDE_ATTR] == pytest.approx(tr.next_side(before))
        best = min(before, key=lambda u: float(u.value or 0.0))
        region = tr.box(space, best.params, t.system_attrs[tr.SIDE_ATTR])
        assert tr.outside(region, space, t.params) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("how", ["trust_region off", "declared noisy"])
def test_without_the_trust_region_no_trial_is_local(how):
    """No local steps with the trust region off, nor for an objective declared noisy (their
    centre, the best observation, is often a lucky draw there)."""
    sampler = make_sampler("gp", 0, 4, noisy=how == "declared noisy")
    assert isinstance(sampler, FailureAwareGPSampler)
    if how == "trust_region off":
        sampler.trust_region = False
    study = optuna.create_study(sampler=sampler)
    study.optimize(_ripples, n_trials=9)
    assert not any(tr.SIDE_ATTR in t.system_attrs for t in study.trials)
    assert len({tuple(t.params.values()) for t in study.trials}) == 9  # it still samples


def test_nearest_takes_the_points_inside_or_the_two_d_closest():
    space = {"x": FloatDistribution(0.0, 1.0)}
    obs = [create_trial(state=TrialState.COMPLETE, value=0.0, params={"x": x},
                        distributions=space) for x in (0.05, 0.5, 0.52, 0.9)]
    region = tr.box(space, {"x": 0.5}, 0.9)  # all four inside
    assert [t.params["x"] for t in tr.nearest(obs, region, space)] == [0.05, 0.5, 0.52, 0.9]
    region = tr.box(space, {"x": 0.5}, 0.01)  # one point inside: the 2·d = 2 nearest
    assert [t.params["x"] for t in tr.nearest(obs, region, space)] == [0.5, 0.52]


def test_an_enqueued_trial_is_not_a_local_step():
    """Its parameters are fixed, so it says nothing about how the box did."""
    study = optuna.create_study(sampler=make_sampler("gp", 0, 4))
    study.optimize(_ripples, n_trials=7)  # trials 5 local, 6 global
    study.enqueue_trial({"x": 1.0, "y": 0.1, "n": 3})
    study.optimize(_ripples, n_trials=3)  # trial 7 enqueued (would be local), 8 global, 9 local
    trials = study.trials
    assert tr.is_local(7, 4) and trials[7].params["x"] == 1.0
    assert [tr.SIDE_ATTR in t.system_attrs for t in trials[4:]] == [False, True, False, False,
                                                                    False, True]


def test_a_maximised_study_centres_its_box_on_the_highest_value_and_imputes_the_lowest():
    from cifarlab.tune.samplers import IMPUTE_ATTR, observations_for_surrogate

    study = optuna.create_study(direction="maximize", sampler=make_sampler("gp", 0, 4))
    study.optimize(lambda t: -_ripples(t), n_trials=12)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    space = trials[0].distributions
    for t in (t for t in trials if tr.SIDE_ATTR in t.system_attrs):
        before = [u for u in trials if u.number < t.number]
        assert t.system_attrs[tr.SIDE_ATTR] == pytest.approx(tr.next_side(before, True))
        best = max(before, key=lambda u: float(u.value or 0.0))
        region = tr.box(space, best.params, t.system_attrs[tr.SIDE_ATTR])
        assert tr.outside(region, space, t.params) == pytest.approx(0.0, abs=1e-9)

    failed = study.ask()
    failed.suggest_float("x", -5.0, 5.0)
    failed.suggest_float("y", 1e-3, 1.0, log=True)
    failed.suggest_int("n", 0, 10)
    failed.set_user_attr(IMPUTE_ATTR, True)
    study.tell(failed, state=TrialState.FAIL)
    imputed = observations_for_surrogate(study.trials, space, maximize=True)[-1]
    assert imputed.value == min(float(t.value or 0.0) for t in trials)


def test_next_side_reads_success_in_the_study_direction():
    start = [_trial(i, float(i)) for i in range(4)]  # maximising: best so far 3.0
    assert tr.next_side([*start, _trial(4, 5.0, 0.2)], maximize=True) == pytest.approx(0.4)
    assert tr.next_side([*start, _trial(4, 5.0, 0.2)]) == pytest.approx(0.2)  # minimising


def test_posterior_centre_passes_over_a_lucky_draw_in_a_bad_region():
    """``trust_centre = "posterior"`` (a bo_suite candidate): the box goes to the completed trial
    with the best posterior mean, not to one lucky observation among poor neighbours."""
    import numpy as np

    space = {"x": FloatDistribution(0.0, 1.0)}
    rng = np.random.default_rng(0)
    points = [(x, rng.normal(0.0, 0.1)) for x in np.linspace(0.1, 0.2, 10)]
    points += [(x, 1.0 + rng.normal(0.0, 0.1)) for x in np.linspace(0.8, 0.9, 10)]
    points.append((0.85, -0.35))  # the lucky draw: the best observation
    sampler = make_sampler("gp", 0, 4)
    assert isinstance(sampler, FailureAwareGPSampler)
    sampler.trust_region = False
    study = optuna.create_study(sampler=sampler)
    for x, y in points:
        study.add_trial(create_trial(params={"x": x}, distributions=space, value=y))
    study.ask({"x": space["x"]})  # fits the global GP
    fitted = sampler._gprs_cache_list[0]
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    values = np.array([t.value for t in completed])
    assert tr.posterior_centre(completed, values, space, None).params["x"] == 0.85
    assert 0.1 <= tr.posterior_centre(completed, values, space, fitted).params["x"] <= 0.2
