"""Sampler benchmark: cifarlab's GP against Optuna's GPSampler, TPE and random search, and
(when their environment exists) HEBO and scikit-optimize's GP.

    python bench/bo_suite.py [--seeds 10] [--jobs 2] [--problems ...] [--samplers ...]
    python bench/bo_suite.py --setup-peers      # makes bench-out/peers-venv (HEBO, skopt)
    python bench/bo_suite.py timing [--trials 100]

Problems (`bench/bo_functions.py`): 10 standard test functions in 2-10 dimensions, two noisy
variants, two mixed integer/categorical ones and one with a failing region; budgets 40-80
evaluations. Each sampler's *recommendation* is scored on the true (noise-free) function:
cifarlab recommends by the GP's posterior mean (`cifarlab.tune.samplers.recommend`), the others
their best observation. Reports the median and IQR of final regret (recommended value minus the
known minimum) and the mean seconds per suggestion. Every finished run is saved to
``--results`` at once, so the suite resumes. ``timing`` measures seconds per suggestion at trial
100 of one Hartmann6 study, alone. Both write their tables into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, publish, write_section
from bo_functions import PROBLEMS, Problem
from cifarlab.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / "bench-out" / "peers-venv"
OPTUNA_SAMPLERS = ("cifarlab-gp", "optuna-gp", "optuna-tpe", "random")
CANDIDATES = ("cifarlab-gp-global", "cifarlab-gp-tr-mean", "cifarlab-gp-mean-prior", "cifarlab-gp-warp", "cifarlab-gp-reflect",
              "cifarlab-gp-mix-reflect", "cifarlab-gp-d1",
              "cifarlab-gp-ls2", "cifarlab-gp-ls3", "cifarlab-gp-ls5", "cifarlab-gp-ls8",
              "cifarlab-gp-optuna-prior")  # cifarlab variants measured before they ship
PEERS = ("hebo", "skopt")


def make(name: str, seed: int, n_trials: int, noisy: bool = False):
    import optuna

    from cifarlab.tune.samplers import default_startup, log_prior, make_sampler

    if name.startswith("cifarlab-gp"):
        # the shipped sampler is told whether the objective is noisy, as its API allows
        sampler = make_sampler("gp", seed, default_startup(n_trials),
                               noisy=noisy and name == "cifarlab-gp")
        sampler.input_warping = name == "cifarlab-gp-warp"  # type: ignore[attr-defined]
        sampler.reflect = name.endswith("reflect")  # type: ignore[attr-defined]
        sampler.startup_per_dimension = name == "cifarlab-gp-d1"  # type: ignore[attr-defined]
        if name == "cifarlab-gp-tr-mean":  # the local box around the best posterior mean
            sampler.trust_centre = "posterior"  # type: ignore[attr-defined]
        elif name != "cifarlab-gp":
            # every other candidate was measured without the trust region's local steps
            # (cifarlab-gp-global: the shipped sampler before them, 2026-11-27)
            sampler.trust_region = False  # type: ignore[attr-defined]
        if name not in ("cifarlab-gp", "cifarlab-gp-global", "cifarlab-gp-tr-mean"):
            # and with the GP's prior mean at the values' mean, the shipped sampler's until
            # 2026-11-27 (cifarlab-gp-mean-prior)
            sampler.prior_mean_quantile = None  # type: ignore[attr-defined]
        if name in ("cifarlab-gp-optuna-prior", "cifarlab-gp-warp", "cifarlab-gp-reflect"):
            # Optuna's own length-scale prior: the sampler before 2026-11-27, on which the
            # stored warp and reflect runs were measured
            sampler._log_prior = functools.partial(  # type: ignore[attr-defined]
                log_prior, modes=(1.0,))
        elif name.startswith("cifarlab-gp-ls"):  # one short mode, 1/k of the range
            k = float(name.removeprefix("cifarlab-gp-ls"))
            sampler._log_prior = functools.partial(  # type: ignore[attr-defined]
                log_prior, modes=(1 / k,))
        return sampler
    if name == "optuna-gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "optuna-tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _suggest(trial, problem: Problem) -> dict[str, Any]:
    x: dict[str, Any] = {}
    for p in problem.params:
        if p[1] == "float":
            x[p[0]] = trial.suggest_float(p[0], p[2], p[3])
        elif p[1] == "int":
            x[p[0]] = trial.suggest_int(p[0], p[2], p[3])
        else:
            x[p[0]] = trial.suggest_categorical(p[0], list(p[2]))
    return x


def run_optuna(problem: Problem, sname: str, seed: int) -> dict[str, Any]:
    import optuna
    import torch
    from optuna.trial import TrialState

    from cifarlab.tune.samplers import IMPUTE_ATTR, recommend

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=make(sname, seed, problem.budget,
                                             noisy=problem.kind == "noisy"))
    rng = np.random.default_rng(seed + 1000)  # the noise: the same draws for every sampler
    seconds, failed, at_bound = 0.0, 0, 0
    floats = [(p[0], p[2], p[3]) for p in problem.params if p[1] == "float"]
    for _ in range(problem.budget):
        t0 = time.perf_counter()
        trial = study.ask()
        x = _suggest(trial, problem)
        seconds += time.perf_counter() - t0
        at_bound += any(min(x[k] - lo, hi - x[k]) <= 1e-9 * (hi - lo) for k, lo, hi in floats)
        y = problem.observe(x, rng)
        if y is None:
            failed += 1
            trial.set_user_attr(IMPUTE_ATTR, True)  # as cifarlab's objective flags a failure
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, y)
    best_observed = problem.value(study.best_trial.params) - problem.fmin
    out = {"regret": best_observed, "regret_best_observed": best_observed,
           "seconds": seconds / problem.budget, "failed": failed,
           "at_bound": at_bound / problem.budget}
    if sname.startswith("cifarlab-gp"):  # told whether the objective is noisy, as its API allows
        out["regret_posterior_mean"] = (
            problem.value(recommend(study, noisy=True).params) - problem.fmin)
        if problem.noise_sd:
            out["regret"] = out["regret_posterior_mean"]
    return out


def run_one(args: tuple[str, str, int]) -> tuple[str, str, int, dict[str, Any]]:
    pname, sname, seed = args
    if sname in PEERS:
        done = subprocess.run([str(PEERS_VENV / "bin" / "python"), __file__.replace(
            "bo_suite.py", "bo_peers.py"), pname, sname, str(seed)], capture_output=True,
            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{sname} on {pname}: {done.stderr[-2000:]}")
        return pname, sname, seed, json.loads(done.stdout.strip().splitlines()[-1])
    return pname, sname, seed, run_optuna(PROBLEMS[pname], sname, seed)


def setup_peers() -> None:
    """A separate environment for HEBO and scikit-optimize, torch pinned by constraints.txt."""
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                    str(ROOT / "constraints.txt"), "-r",
                    str(ROOT / "bench" / "peers-requirements.txt")], check=True)


def suite(a: argparse.Namespace) -> None:
    samplers = list(a.samplers or [*OPTUNA_SAMPLERS, *(PEERS if PEERS_VENV.exists() else ())])
    problems = a.problems or list(PROBLEMS)
    results = json.loads(a.results.read_text()) if a.results.exists() else {}
    tasks = [(p, s, seed) for p in problems for s in samplers for seed in range(a.seeds)
             if f"{p}/{s}/{seed}" not in results]
    # slowest first so the pool does not end on one long run
    cost = {"hebo": 0, "skopt": 1, "optuna-gp": 2, "optuna-tpe": 3}

    def rank(sampler: str) -> int:
        return 2 if sampler.startswith("cifarlab-gp") else cost.get(sampler, 4)

    tasks.sort(key=lambda t: (rank(t[1]), -PROBLEMS[t[0]].budget))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as pool:
        for pname, sname, seed, r in pool.map(run_one, tasks):
            results[f"{pname}/{sname}/{seed}"] = r
            a.results.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(a.results, json.dumps(results, indent=1))
            print(f"{pname:<18} {sname:<12} seed {seed:>2}: regret {r['regret']:.4g}  "
                  f"{r['seconds'] * 1000:.1f} ms/suggestion", flush=True)
    # the table shows every sampler and problem of the results file, not only this invocation's
    # (a run of one sampler must not drop the others from the published section)
    stored = {k.split("/")[1] for k in results} | set(samplers)
    shown = [s for s in (*OPTUNA_SAMPLERS[:1], *CANDIDATES, *OPTUNA_SAMPLERS[1:], *PEERS)
             if s in stored]
    stored_problems = {k.split("/")[0] for k in results} | set(problems)
    report(results, [p for p in PROBLEMS if p in stored_problems], shown, a.seeds,
           time.perf_counter() - t0, a.jobs)


def _scored(r: dict[str, Any], problem: Problem, sname: str) -> dict[str, Any]:
    """cifarlab-gp's recommendation as the shipped ``recommend(study, noisy=...)`` makes it:
    by posterior mean on noisy problems, its best observation otherwise (results from before
    that choice stored the posterior-mean regret under ``regret``)."""
    if not sname.startswith("cifarlab-gp") or "regret_best_observed" not in r:
        return r
    pm = r.get("regret_posterior_mean", r["regret"])
    return {**r, "regret": pm if problem.noise_sd else r["regret_best_observed"]}


def report(results: dict, problems: list[str], samplers: list[str], seeds: int, wall: float,
           jobs: int) -> None:
    lines = [
        "## Sampler suite (`bench/bo_suite.py`)",
        "",
        f"Machine: {machine()}. {seeds} seeds per cell, {jobs} runs at a time (one thread "
        f"each); this invocation ran {wall / 60:.1f} min (runs already in the results file "
        "were kept). Final regret = true value of the recommended point − known minimum, "
        "lower is better: median [IQR]; `ms` is the mean seconds per suggestion. Every sampler "
        "recommends its best observation, except cifarlab-gp on the noisy problems, where it "
        "is told the objective is noisy and recommends its best posterior mean. Bold: the "
        "lowest median of the row.",
        "",
        "| problem (dims, evals) | " + " | ".join(samplers) + " |",
        "|---|" + "---|" * len(samplers),
    ]
    ours = [s for s in samplers if s.startswith("cifarlab")]
    wins: dict[str, list[str]] = {s: [] for s in ours}
    counted: dict[str, list[str]] = {s: [] for s in ours}
    bound: dict[str, list[float]] = {s: [] for s in samplers}
    for pname in problems:
        prob = PROBLEMS[pname]
        med: dict[str, float] = {}
        cells: dict[str, str] = {}
        for sname in samplers:
            rows = [results.get(f"{pname}/{sname}/{seed}") for seed in range(seeds)]
            rows = [_scored(r, PROBLEMS[pname], sname) for r in rows if r is not None]
            if not rows:
                cells[sname] = "–"
                continue
            r = np.array([x["regret"] for x in rows], dtype=float)
            q1, m, q3 = np.nanpercentile(r, [25, 50, 75])
            med[sname] = float(m)
            bound[sname] += [x["at_bound"] for x in rows if "at_bound" in x]
            ms = np.mean([x["seconds"] for x in rows]) * 1000
            cells[sname] = f"{m:.3g} [{q1:.3g}, {q3:.3g}] · {ms:.0f} ms" + (
                "" if len(rows) == seeds else f" ({len(rows)} seeds)")
        if med:
            lo = min(med.values())
            for sname, m in med.items():
                if m == lo:
                    cells[sname] = f"**{cells[sname]}**"
        lines.append(f"| {pname} ({prob.dim}D, {prob.budget}) | "
                     + " | ".join(cells[s] for s in samplers) + " |")
        peers = [s for s in med if not s.startswith("cifarlab")]
        for mine in ours:
            if mine in med and peers:
                counted[mine].append(pname)
                if med[mine] <= min(med[s] for s in peers):
                    wins[mine].append(pname)
    lines.append("")
    for mine in ours:
        share = len(wins[mine]) / max(1, len(counted[mine]))
        lines.append(
            f"Target ({mine}): median regret at most the best peer's on at least 75% of the "
            f"problems: {len(wins[mine])}/{len(counted[mine])} ({share:.0%}): "
            + (f"not judged, {len(counted[mine])} of {len(problems)} problems run."
               if len(counted[mine]) < len(problems)
               else "met." if share >= 0.75 else "**missed**.")
            + (" Not at most the best peer's on: "
               + ", ".join(p for p in counted[mine] if p not in wins[mine]) + "."
               if wins[mine] != counted[mine] else ""))
        lines.append("")
    measured = {s: v for s, v in bound.items() if v}
    if measured:
        lines.append("Suggestions with a float parameter exactly at a bound of its range, "
                     "mean over runs (runs that recorded it): " + ", ".join(
                         f"{s} {np.mean(v):.1%}" for s, v in measured.items()) + ".")
    publish("bo-suite", lines)


def timing(n_trials: int) -> None:
    import optuna
    import torch

    from cifarlab.tune.samplers import default_startup, make_sampler

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    problem = PROBLEMS["hartmann6"]
    rows = []
    for sname in ("cifarlab-gp", "optuna-gp"):
        sampler = (make_sampler("gp", 0, default_startup(n_trials)) if sname == "cifarlab-gp"
                   else optuna.samplers.GPSampler(seed=0))
        study = optuna.create_study(sampler=sampler)
        times = []
        for _ in range(n_trials):
            t0 = time.perf_counter()
            trial = study.ask()
            x = _suggest(trial, problem)
            times.append(time.perf_counter() - t0)
            study.tell(trial, problem.value(x))
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
    p.add_argument("--problems", nargs="*", choices=list(PROBLEMS))
    p.add_argument("--samplers", nargs="*", choices=[*OPTUNA_SAMPLERS, *CANDIDATES, *PEERS])
    p.add_argument("--results", type=Path, default=ROOT / "bench-out" / "bo-suite.json")
    p.add_argument("--setup-peers", action="store_true")
    a = p.parse_args()
    if a.setup_peers:
        setup_peers()
    elif a.mode == "timing":
        timing(a.trials)
    else:
        suite(a)


if __name__ == "__main__":
    main()
