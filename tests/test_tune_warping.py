"""Input warping of the GP sampler (cifarlab.tune.warping)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from cifarlab.tune.samplers import make_sampler
from cifarlab.tune.warping import fit_input_warp, kumaraswamy, kumaraswamy_inverse

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPACE = {"lr": FloatDistribution(1e-3, 10.0, log=True), "x": FloatDistribution(-1.0, 1.0),
         "n": IntDistribution(0, 12, step=4), "c": CategoricalDistribution(["a", "b"])}


def test_kumaraswamy_is_a_monotone_bijection_of_the_unit_interval():
    u = np.linspace(0, 1, 101)
    for a, b in ((1.0, 1.0), (0.3, 2.0), (4.0, 0.5)):
        w = kumaraswamy(u, np.array(a), np.array(b))
        assert w[0] == pytest.approx(0, abs=1e-4) and w[-1] == pytest.approx(1, abs=1e-4)
        assert np.all(np.diff(w) >= 0)
        inner = u[1:-1]
        back = kumaraswamy_inverse(kumaraswamy(inner, np.array(a), np.array(b)),
                                   np.array(a), np.array(b))
        assert np.allclose(back, inner, atol=1e-6)
    assert np.allclose(kumaraswamy(u[1:-1], np.array(1.0), np.array(1.0)), u[1:-1], atol=1e-9)


def _fitted(values):
    rng = np.random.default_rng(0)
    x = rng.random((30, 4))
    x[:, 2] = rng.integers(0, 4, 30) / 3  # n's grid
    x[:, 3] = rng.integers(0, 2, 30)  # c's index
    y = values(x)
    return fit_input_warp(x, (y - y.mean()) / y.std(), SPACE)


def test_warp_covers_only_the_continuous_parameters_and_round_trips():
    warp = _fitted(lambda x: np.sin(6 * x[:, 0]) + x[:, 1])
    assert warp is not None and list(warp.dims) == [0, 1]
    params = {"lr": 0.05, "x": 0.25, "n": 8, "c": "b"}
    warped = warp.warp(params)
    assert warped["n"] == 8 and warped["c"] == "b"
    assert 1e-3 <= warped["lr"] <= 10 and -1 <= warped["x"] <= 1
    back = warp.unwarp(warped)
    assert back["lr"] == pytest.approx(0.05, rel=1e-6) and back["x"] == pytest.approx(0.25)
    assert warp.unwarp({"lr": 10.0, "x": -1.0, "n": 0, "c": "a"})["lr"] <= 10.0


def test_a_loss_that_moves_only_near_one_end_is_warped_there():
    """The loss changes only in the top tenth of x's range (a divergence edge): the fitted warp
    stretches that tenth, so it covers more than a tenth of the warped range. A smooth
    parameter (lr, here linear in its log) is left nearly as it was."""
    warp = _fitted(lambda x: np.tanh((x[:, 1] - 0.9) * 40) + 0.3 * x[:, 0])
    assert warp is not None
    top = 1 - kumaraswamy(np.array([0.9]), warp.a[1], warp.b[1])[0]
    assert top > 0.2, (warp.a, warp.b)
    mid = kumaraswamy(np.array([0.5]), warp.a[0], warp.b[0])[0]
    assert abs(mid - 0.5) < 0.2


def test_nothing_to_warp_without_a_continuous_parameter():
    space = {"n": IntDistribution(0, 12, step=4), "c": CategoricalDistribution(["a", "b"])}
    x = np.array([[0, 0], [1 / 3, 1], [1, 0], [2 / 3, 1]], dtype=float)
    assert fit_input_warp(x, np.array([0.0, 1.0, -1.0, 0.5]), space) is None


def test_gp_sampler_with_input_warping_suggests_valid_points_and_improves():
    """Every suggestion of the warped sampler is inside the space (log, stepped, integer and
    categorical parameters) with parallel asks pending, and it improves on its random start."""
    sampler = make_sampler("gp", 0, 6)
    sampler.input_warping = True  # type: ignore[attr-defined]
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 10.0, log=True)
        x = trial.suggest_float("x", -1.0, 1.0)
        m = trial.suggest_float("m", 0.5, 0.9, step=0.1)
        n = trial.suggest_int("n", 0, 12, step=4)
        c = trial.suggest_categorical("c", ["a", "b"])
        assert 1e-3 <= lr <= 10 and -1 <= x <= 1 and n in (0, 4, 8, 12) and c in ("a", "b")
        assert any(math.isclose(m, v) for v in (0.5, 0.6, 0.7, 0.8, 0.9))
        return (math.log10(lr) - 0.3) ** 2 + (x - 0.4) ** 2 + n / 100 + (c == "b") + m

    study.optimize(objective, n_trials=16)
    pending = [study.ask() for _ in range(2)]
    for t in pending:
        objective(t)
    assert pending[0].params != pending[1].params
    first = min(t.value for t in study.trials[:6])
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 16 and study.best_value < first
