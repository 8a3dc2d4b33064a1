"""Sampler benchmark: cifarlab's GP configuration against Optuna's GPSampler, TPE and random.

    python bench/bo_suite.py [--seeds 10] [--jobs 2]
    python bench/bo_suite.py timing [--trials 100]

Functions and budgets (the issue's): Branin 2D / 50 evaluations, Hartmann6 / 80, Levy 10D / 80,
Rosenbrock 4D / 50; 10 seeds each. Reports the median and IQR of final simple regret (best value
found minus the known minimum) and the mean seconds per suggestion (ask + suggest, objective
excluded). ``timing`` measures the seconds per suggestion at trial 100 of one Hartmann6 study,
on all cores, alone. Both write their tables into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section

# ---------------------------------------------------------------------------- functions


def branin(x: np.ndarray) -> float:
    x1, x2 = x
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi
    r, s, t = 6.0, 10.0, 1 / (8 * math.pi)
    return float(a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s)


_H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                  [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(x: np.ndarray) -> float:
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


def levy(x: np.ndarray) -> float:
    w = 1 + (x - 1) / 4
    head = math.sin(math.pi * w[0]) ** 2
    mid = np.sum((w[:-1] - 1) ** 2 * (1 + 10 * np.sin(math.pi * w[:-1] + 1) ** 2))
    tail = (w[-1] - 1) ** 2 * (1 + math.sin(2 * math.pi * w[-1]) ** 2)
    return float(head + mid + tail)


def rosenbrock(x: np.ndarray) -> float:
    return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


# name: (function, bounds per dimension, dimensions, known minimum, evaluations)
FUNCTIONS = {
    "branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 2, 0.397887357729738, 50),
    "hartmann6": (hartmann6, [(0.0, 1.0)] * 6, 6, -3.32236801141551, 80),
    "levy10": (levy, [(-10.0, 10.0)] * 10, 10, 0.0, 80),
    "rosenbrock4": (rosenbrock, [(-5.0, 10.0)] * 4, 4, 0.0, 50),
}
SAMPLERS = ("cifarlab-gp", "optuna-gp", "optuna-tpe", "random")


def make(name: str, seed: int, n_trials: int):
    import optuna

    from cifarlab.tune.samplers import default_startup, make_sampler

    if name == "cifarlab-gp":
        return make_sampler("gp", seed, default_startup(n_trials))
    if name == "optuna-gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "optuna-tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def run_one(args: tuple[str, str, int]) -> tuple[str, str, int, float, float]:
    """(function, sampler, seed, final regret, mean seconds per suggestion)."""
    fname, sname, seed = args
    import optuna
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fn, bounds, _, fmin, n = FUNCTIONS[fname]
    study = optuna.create_study(sampler=make(sname, seed, n))
    suggest_seconds = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        x = np.array([trial.suggest_float(f"x{i}", lo, hi) for i, (lo, hi) in enumerate(bounds)])
        suggest_seconds += time.perf_counter() - t0
        study.tell(trial, fn(x))
    return fname, sname, seed, study.best_value - fmin, suggest_seconds / n


def suite(seeds: int, jobs: int) -> None:
    tasks = [(f, s, seed) for f in FUNCTIONS for s in SAMPLERS for seed in range(seeds)]
    # longest first so the pool does not end on one slow GP run
    tasks.sort(key=lambda t: (t[1] == "random", t[1] == "optuna-tpe", -FUNCTIONS[t[0]][4]))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        for fname, sname, seed, regret, sec in pool.map(run_one, tasks):
            results.setdefault((fname, sname), []).append((regret, sec))
            print(f"{fname:<12} {sname:<12} seed {seed:>2}: regret {regret:.4g}  "
                  f"{sec * 1000:.1f} ms/suggestion", flush=True)
    wall = time.perf_counter() - t0

    lines = [
        "## Sampler suite (`bench/bo_suite.py`)",
        "",
        f"Machine: {machine()}. {seeds} seeds per cell, {jobs} runs at a time (one thread "
        f"each), {wall / 60:.1f} min in all. Final simple regret = best value found − known "
        "minimum, lower is better: median [IQR]. `ms/sugg` is the mean time of one suggestion "
        "(ask + suggest) over the whole run. cifarlab-gp is `make_sampler('gp')`: Optuna's "
        "GPSampler with failed and pruned trials imputed for the surrogate (no trial fails "
        "here, so it should match optuna-gp in distribution) and the same 10 start-up trials "
        "at these budgets.",
        "",
        "| function (evals) | " + " | ".join(SAMPLERS) + " |",
        "|---|" + "---|" * len(SAMPLERS),
    ]
    verdicts = []
    for fname, (_, _, dim, _, n) in FUNCTIONS.items():
        cells, medians = [], {}
        for sname in SAMPLERS:
            r = np.array([x[0] for x in results[(fname, sname)]])
            s = np.array([x[1] for x in results[(fname, sname)]])
            q1, med, q3 = np.percentile(r, [25, 50, 75])
            medians[sname] = med
            cells.append(f"{med:.3g} [{q1:.3g}, {q3:.3g}] · {s.mean() * 1000:.0f} ms/sugg")
        lines.append(f"| {fname} {dim}D ({n}) | " + " | ".join(cells) + " |")
        verdicts.append((fname, medians))
    lines += ["", "Targets, from the medians above:"]
    no_worse = [f for f, m in verdicts if m["cifarlab-gp"] <= m["optuna-gp"]]
    beats = [f for f, m in verdicts
             if m["cifarlab-gp"] < m["optuna-tpe"] and m["cifarlab-gp"] < m["random"]]
    lines.append(f"- median regret no worse than Optuna GPSampler defaults: "
                 f"{len(no_worse)}/4 functions ({', '.join(no_worse) or 'none'}); "
                 + ("met." if len(no_worse) == 4 else "NOT met on "
                    + ", ".join(f for f, _ in verdicts if f not in no_worse) + "."))
    lines.append(f"- better than both TPE and random: {len(beats)}/4 "
                 f"({', '.join(beats) or 'none'}); target at least 3: "
                 + ("met." if len(beats) >= 3 else "MISSED."))
    body = "\n".join(lines)
    print(body)
    write_section("bo-suite", body)


def timing(n_trials: int) -> None:
    import optuna
    import torch

    from cifarlab.tune.samplers import default_startup, make_sampler

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fn, bounds, _, _, _ = FUNCTIONS["hartmann6"]
    rows = []
    for sname in ("cifarlab-gp", "optuna-gp"):
        sampler = (make_sampler("gp", 0, default_startup(n_trials)) if sname == "cifarlab-gp"
                   else optuna.samplers.GPSampler(seed=0))
        study = optuna.create_study(sampler=sampler)
        times = []
        for _ in range(n_trials):
            t0 = time.perf_counter()
            trial = study.ask()
            x = np.array([trial.suggest_float(f"x{i}", lo, hi)
                          for i, (lo, hi) in enumerate(bounds)])
            times.append(time.perf_counter() - t0)
            study.tell(trial, fn(x))
        last = np.array(times[-10:])
        rows.append(f"| {sname} | {np.median(last):.3f} | {last.max():.3f} | "
                    f"{np.mean(times):.3f} |")
    body = "\n".join([
        "## Seconds per suggestion at 100 trials (`bench/bo_suite.py timing`)",
        "",
        f"Machine: {machine()}; torch threads {torch.get_num_threads()}, nothing else "
        f"running. Hartmann6, one study of {n_trials} trials; the last 10 suggestions "
        "(trials 91-100) are the ones at 100 trials. Target: at most 0.2 s.",
        "",
        "| sampler | median s (last 10) | max s (last 10) | mean s (all) |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    write_section("bo-timing", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", nargs="?", default="suite", choices=["suite", "timing"])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--trials", type=int, default=100)
    a = p.parse_args()
    if a.mode == "timing":
        timing(a.trials)
    else:
        suite(a.seeds, a.jobs)


if __name__ == "__main__":
    main()
