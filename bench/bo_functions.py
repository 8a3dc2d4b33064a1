"""The optimization problems of `bench/bo_suite.py`: standard test functions with known minima,
and noisy, mixed integer/categorical and failing-region variants.

Needs numpy only, so a peer optimizer running in its own virtual environment (HEBO and
scikit-optimize pin other numpy and scipy versions) imports the same problems.

A problem's parameters are ``(name, kind, low, high)`` for ``float`` and ``int`` and
``(name, "cat", choices)`` for categoricals. ``value(x)`` is the true (noise-free) value of a
point, a dict by parameter name; ``observe(x, rng)`` is what an optimizer sees: the value plus
Gaussian noise of ``noise_sd``, or None where the point fails (the trial errors out, as a
diverging training run does). Regret is always measured on the true value of the point the
optimizer recommends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------- functions


def branin(x: np.ndarray) -> float:
    x1, x2 = x
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi
    r, s, t = 6.0, 10.0, 1 / (8 * math.pi)
    return float(a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s)


def six_hump_camel(x: np.ndarray) -> float:
    x1, x2 = x
    return float((4 - 2.1 * x1**2 + x1**4 / 3) * x1**2 + x1 * x2 + (-4 + 4 * x2**2) * x2**2)


_H3_A = np.array([[3.0, 10, 30], [0.1, 10, 35], [3.0, 10, 30], [0.1, 10, 35]])
_H3_P = 1e-4 * np.array([[3689, 1170, 2673], [4699, 4387, 7470], [1091, 8732, 5547],
                         [381, 5743, 8828]])
_H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                  [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann3(x: np.ndarray) -> float:
    return float(-np.sum(_H_ALPHA * np.exp(-np.sum(_H3_A * (x - _H3_P) ** 2, axis=1))))


def hartmann6(x: np.ndarray) -> float:
    return float(-np.sum(_H_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


def levy(x: np.ndarray) -> float:
    w = 1 + (x - 1) / 4
    head = math.sin(math.pi * w[0]) ** 2
    mid = np.sum((w[:-1] - 1) ** 2 * (1 + 10 * np.sin(math.pi * w[:-1] + 1) ** 2))
    tail = (w[-1] - 1) ** 2 * (1 + math.sin(2 * math.pi * w[-1]) ** 2)
    return float(head + mid + tail)


def rosenbrock(x: np.ndarray) -> float:
    return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


def ackley(x: np.ndarray) -> float:
    d = len(x)
    return float(-20 * math.exp(-0.2 * math.sqrt(np.sum(x**2) / d))
                 - math.exp(np.sum(np.cos(2 * math.pi * x)) / d) + 20 + math.e)


def michalewicz(x: np.ndarray) -> float:
    i = np.arange(1, len(x) + 1)
    return float(-np.sum(np.sin(x) * np.sin(i * x**2 / math.pi) ** 20))


def styblinski_tang(x: np.ndarray) -> float:
    return float(0.5 * np.sum(x**4 - 16 * x**2 + 5 * x))


def rastrigin(x: np.ndarray) -> float:
    return float(10 * len(x) + np.sum(x**2 - 10 * np.cos(2 * math.pi * x)))


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    name: str
    params: tuple[tuple[Any, ...], ...]
    value: Callable[[dict[str, Any]], float]
    fmin: float
    budget: int
    noise_sd: float = 0.0
    fails: Callable[[dict[str, Any]], bool] | None = None
    kind: str = "standard"  # standard | noisy | mixed | failing

    @property
    def dim(self) -> int:
        return len(self.params)

    def observe(self, x: dict[str, Any], rng: np.random.Generator) -> float | None:
        if self.fails is not None and self.fails(x):
            return None
        return self.value(x) + (float(rng.normal(0.0, self.noise_sd)) if self.noise_sd else 0.0)


def _box(fn: Callable[[np.ndarray], float], bounds: list[tuple[float, float]]):
    params = tuple((f"x{i}", "float", lo, hi) for i, (lo, hi) in enumerate(bounds))

    def value(x: dict[str, Any]) -> float:
        return fn(np.array([x[f"x{i}"] for i in range(len(bounds))], dtype=float))

    return params, value


def _standard(name: str, fn, bounds, fmin: float, budget: int, **kw: Any) -> Problem:
    params, value = _box(fn, bounds)
    return Problem(name, params, value, fmin, budget, **kw)


def _mixed_ackley() -> Problem:
    """Ackley in 5-D with two integer coordinates, and a categorical that adds an offset."""
    params = (("x0", "float", -5.0, 5.0), ("x1", "float", -5.0, 5.0), ("x2", "float", -5.0, 5.0),
              ("k0", "int", -5, 5), ("k1", "int", -5, 5), ("c", "cat", ("a", "b", "c")))

    def value(x: dict[str, Any]) -> float:
        v = np.array([x["x0"], x["x1"], x["x2"], x["k0"], x["k1"]], dtype=float)
        return ackley(v) + {"a": 1.0, "b": 0.0, "c": 2.0}[x["c"]]

    return Problem("mixed-ackley", params, value, 0.0, 60, kind="mixed")


def _mixed_hartmann() -> Problem:
    """Hartmann6 with x3..x5 on a 0.1 grid (ints 0..10) and a categorical that rescales."""
    params = (("x0", "float", 0.0, 1.0), ("x1", "float", 0.0, 1.0), ("x2", "float", 0.0, 1.0),
              ("k3", "int", 0, 10), ("k4", "int", 0, 10), ("k5", "int", 0, 10),
              ("scale", "cat", (0.5, 1.0, 0.8)))

    def value(x: dict[str, Any]) -> float:
        v = np.array([x["x0"], x["x1"], x["x2"], x["k3"] / 10, x["k4"] / 10, x["k5"] / 10])
        return hartmann6(v) * x["scale"]

    # the grid minimum, near the continuous optimum's x3..x5 = (0.2753, 0.3117, 0.6573)
    return Problem("mixed-hartmann6", params, value, _MIXED_H6_MIN, 80, kind="mixed")


_MIXED_H6_MIN = -3.2531052  # min over x0..x2 with (x3,x4,x5) on the grid (check_minima)


def _failing_hartmann() -> Problem:
    """Hartmann6 that fails (the trial errors out) where x2 < 0.45: the optimum, at x2 = 0.477,
    sits at the edge of the failing region, as a best learning rate sits next to divergence."""
    params, value = _box(hartmann6, [(0.0, 1.0)] * 6)
    return Problem("failing-hartmann6", params, value, -3.32236801141551, 80,
                   fails=lambda x: x["x2"] < 0.45, kind="failing")


PROBLEMS: dict[str, Problem] = {p.name: p for p in [
    _standard("branin", branin, [(-5.0, 10.0), (0.0, 15.0)], 0.397887357729738, 50),
    _standard("camel6", six_hump_camel, [(-3.0, 3.0), (-2.0, 2.0)], -1.0316284534898774, 40),
    _standard("hartmann3", hartmann3, [(0.0, 1.0)] * 3, -3.86278214782076, 50),
    _standard("rosenbrock4", rosenbrock, [(-5.0, 10.0)] * 4, 0.0, 50),
    _standard("ackley5", ackley, [(-32.768, 32.768)] * 5, 0.0, 80),
    _standard("michalewicz5", michalewicz, [(0.0, math.pi)] * 5, -4.687658, 80),
    _standard("hartmann6", hartmann6, [(0.0, 1.0)] * 6, -3.32236801141551, 80),
    _standard("rastrigin6", rastrigin, [(-5.12, 5.12)] * 6, 0.0, 80),
    _standard("styblinski8", styblinski_tang, [(-5.0, 5.0)] * 8, -39.16616570377142 * 8, 80),
    _standard("levy10", levy, [(-10.0, 10.0)] * 10, 0.0, 80),
    _standard("noisy-branin", branin, [(-5.0, 10.0), (0.0, 15.0)], 0.397887357729738, 50,
              noise_sd=2.0, kind="noisy"),
    _standard("noisy-hartmann6", hartmann6, [(0.0, 1.0)] * 6, -3.32236801141551, 80,
              noise_sd=0.1, kind="noisy"),
    _mixed_ackley(),
    _mixed_hartmann(),
    _failing_hartmann(),
]}


def check_minima() -> None:
    """The mixed Hartmann's grid minimum, by multistart local search (run by hand)."""
    from scipy.optimize import minimize

    best = math.inf
    rng = np.random.default_rng(0)
    for k in np.ndindex(11, 11, 11):
        tail = np.array(k) / 10
        if np.abs(tail - np.array([0.2753, 0.3117, 0.6573])).max() > 0.2:
            continue
        for _ in range(3):
            r = minimize(lambda v, t=tail: hartmann6(np.concatenate([v, t])),
                         rng.uniform(0, 1, 3), bounds=[(0, 1)] * 3)
            best = min(best, r.fun)
    print(f"mixed-hartmann6 minimum: {best:.7f}")
