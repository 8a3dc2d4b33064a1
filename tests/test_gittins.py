"""The Gittins index of a staged run (cifarlab.tune.gittins), against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy.stats import norm

from cifarlab.tune.gittins import log_ei, log_stage_index


def ei(mean: float, sd: float, best: float) -> float:
    z = (best - mean) / sd
    return (best - mean) * norm.cdf(z) + sd * norm.pdf(z)


def conditional(mean: np.ndarray, cov: np.ndarray, seen: list[float]) -> tuple[float, float]:
    """The target's (last entry's) mean and sd given the first len(seen) entries."""
    j = len(seen)
    if j == 0:
        return float(mean[-1]), math.sqrt(cov[-1, -1])
    a, b = cov[:j, :j], cov[-1, :j]
    w = np.linalg.solve(a, b)
    m = mean[-1] + w @ (np.array(seen) - mean[:j])
    return float(m), math.sqrt(max(cov[-1, -1] - w @ b, 1e-300))


def value(lam: float, mean: np.ndarray, cov: np.ndarray, best: float, costs: list[float]
          ) -> float:
    """The value of a two-stage run, stopping optimally, at price ``lam``: the definition, its
    expectation over the reported loss taken by adaptive quadrature."""
    m, s = float(mean[0]), math.sqrt(cov[0, 0])

    def after(y: float) -> float:
        m_f, s_f = conditional(mean, cov, [y])
        return max(ei(m_f, s_f, best) - lam * costs[1], 0.0) * norm.pdf(y, m, s)

    total, _ = integrate.quad(after, m - 8 * s, m + 8 * s, limit=200, epsabs=1e-12)
    return total - lam * costs[0]


def value3(lam: float, mean: np.ndarray, cov: np.ndarray, best: float, costs: list[float],
           n: int = 801) -> float:
    """The same for three stages, by a dense trapezoid rule over both reported losses."""
    m1, s1 = float(mean[0]), math.sqrt(cov[0, 0])
    y1 = np.linspace(m1 - 8 * s1, m1 + 8 * s1, n)
    w21 = cov[1, 0] / cov[0, 0]  # the second loss given the first
    m2 = mean[1] + w21 * (y1 - m1)
    s2 = math.sqrt(cov[1, 1] - w21 * cov[1, 0])
    y2 = m2[:, None] + np.linspace(-8 * s2, 8 * s2, n)[None, :]
    w = np.linalg.solve(cov[:2, :2], cov[2, :2])  # the target given both
    m_f = mean[2] + w[0] * (y1[:, None] - m1) + w[1] * (y2 - mean[1])
    s_f = math.sqrt(cov[2, 2] - w @ cov[2, :2])
    z = (best - m_f) / s_f
    gain = np.maximum((best - m_f) * norm.cdf(z) + s_f * norm.pdf(z) - lam * costs[2], 0.0)
    inner = integrate.trapezoid(gain * norm.pdf(y2, m2[:, None], s2), y2, axis=1)
    outer = np.maximum(inner - lam * costs[1], 0.0) * norm.pdf(y1, m1, s1)
    return float(integrate.trapezoid(outer, y1)) - lam * costs[0]


def direct_index(mean: np.ndarray, cov: np.ndarray, best: float, costs: list[float]) -> float:
    e = ei(float(mean[-1]), math.sqrt(cov[-1, -1]), best)
    lo, hi = e / sum(costs) * (1 - 1e-9), e / costs[0] * (1 + 1e-9)
    f = value if len(mean) == 2 else value3
    return optimize.brentq(lambda lam: f(lam, mean, cov, best, costs), lo, hi, rtol=1e-8)


def test_one_stage_left_is_expected_improvement_per_second() -> None:
    mean, sd, best = np.array([[1.2], [0.8]]), np.array([0.3, 0.5]), 1.0
    got = log_stage_index(mean, (sd**2)[:, None, None], best, np.array([2.0]))
    want = [math.log(ei(m, s, best) / 2.0) for m, s in zip(mean[:, 0], sd, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(log_ei(mean[:, 0], sd, best),
                               np.log([ei(1.2, 0.3, best), ei(0.8, 0.5, best)]), rtol=1e-9)


@pytest.mark.parametrize("rho", [0.3, 0.8, 0.97])
def test_two_stages_match_the_definition(rho: float) -> None:
    sd_y, sd_f = 0.6, 0.4
    mean = np.array([1.5, 1.1])
    cov = np.array([[sd_y**2, rho * sd_y * sd_f], [rho * sd_y * sd_f, sd_f**2]])
    costs = [1 / 9, 8 / 9]
    want = direct_index(mean, cov, 1.0, costs)
    got = float(log_stage_index(mean[None], cov[None], 1.0, np.array(costs))[0])
    # 10 Gauss-Hermite nodes per stage: within 4% here (measured; the max() has a kink),
    # where the option adds 0.2 (rho 0.3) to 1.0 (rho 0.97) to the log of EI per second
    assert got == pytest.approx(math.log(want), abs=0.05)
    whole = float(log_ei(mean[1:], np.sqrt(cov[1, 1:]), 1.0)[0]) - math.log(sum(costs))
    assert math.log(want) - whole > 0.15


def test_three_stages_match_the_definition() -> None:
    sd = np.array([0.7, 0.5, 0.4])
    corr = np.array([[1.0, 0.8, 0.6], [0.8, 1.0, 0.85], [0.6, 0.85, 1.0]])
    cov = corr * np.outer(sd, sd)
    mean = np.array([1.6, 1.3, 1.15])
    costs = [1 / 9, 2 / 9, 2 / 3]
    want = direct_index(mean, cov, 1.0, costs)
    got = float(log_stage_index(mean[None], cov[None], 1.0, np.array(costs))[0])
    assert got == pytest.approx(math.log(want), abs=0.05)


def test_the_option_to_stop_is_worth_something_and_never_more_than_a_free_run() -> None:
    rng = np.random.RandomState(0)
    n = 50
    sd = rng.uniform(0.1, 1.0, (n, 2))
    rho = rng.uniform(0.0, 0.99, n)
    cov = np.stack([[sd[:, 0] ** 2, rho * sd[:, 0] * sd[:, 1]],
                    [rho * sd[:, 0] * sd[:, 1], sd[:, 1] ** 2]]).transpose(2, 0, 1)
    mean = rng.uniform(0.5, 3.0, (n, 2))
    costs = np.array([1 / 9, 8 / 9])
    got = log_stage_index(mean, cov, 1.0, costs)
    whole = log_ei(mean[:, 1], sd[:, 1], 1.0)
    assert np.all(got >= whole - np.log(costs.sum()) - 1e-9)  # at least: run to the end
    assert np.all(got <= whole - np.log(costs[0]) + 1e-9)  # at most: the first stage is all
    # a first stage that says nothing about the target is worth nothing as an option
    blind = cov.copy()
    blind[:, 0, 1] = blind[:, 1, 0] = 0.0
    np.testing.assert_allclose(log_stage_index(mean, blind, 1.0, costs),
                               whole - np.log(costs.sum()), atol=1e-6)
    # the more the first stage tells, the more its option is worth (a configuration near the
    # best: far in the tail, 10 nodes per stage do not resolve the few losses that would win)
    assert np.all(np.diff(log_stage_index(
        np.repeat([[1.4, 1.2]], 5, 0),
        np.stack([[[0.25, r * 0.2], [r * 0.2, 0.16]] for r in (0.1, 0.4, 0.7, 0.9, 0.99)]),
        1.0, costs)) > 0)


def test_far_tail_configurations_get_finite_ordered_indices() -> None:
    mean = np.array([[50.0, 40.0], [60.0, 45.0]])
    cov = np.array([[[1.0, 0.9 * 0.5], [0.9 * 0.5, 0.25]]] * 2)
    got = log_stage_index(mean, cov, 0.0, np.array([0.1, 0.9]))
    assert np.all(np.isfinite(got)) and got[0] > got[1]
