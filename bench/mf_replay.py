"""Multi-fidelity samplers replayed on cheap problems: which one finds a good configuration at
the target budget for the least training?

    python bench/mf_replay.py [--problems mf-branin mf-hartmann6] [--seeds 20]
                              [--methods ...] [--results bench-out/mf-replay.json] [--jobs 2]
    python bench/mf_replay.py timing     # seconds per decision at 200 observed points

A *problem* gives the loss of a configuration after a budget ``b`` (a fraction of the target
budget): here the standard multi-fidelity test functions of the BO literature, BoTorch's
AugmentedBranin and AugmentedHartmann (Wu et al. 2019; fidelity ``s = b``; the target ``b = 1``
is the plain function), and ``cifar-curves``: real CIFAR-10 learning curves of airnet
configurations from the demo's search space, recorded by ``bench/record_curves.py`` into
``bench/data/cifar-curves-cpu.json`` (:class:`TabularProblem`); ``cifar-curves-b`` is a second
table of 200 other configurations (``cifar-curves-cpu-b.json``, ``record_curves.py --seed 1``).
Training is replayed: a trial reports its loss at each rung (``b`` = 1/9, 1/3, 1), and what it
costs is the budget it consumed (a continued trial pays only for the rungs it adds; on a
recorded table, training a row again to a budget it already had costs nothing: see
:class:`Replay`). Every method gets the same total budget, counted in target-budget units.

Methods:

* ``cifarlab-mf``: :class:`cifarlab.tune.freezethaw.FreezeThaw` (learning-curve GP, expected
  improvement at the target per unit of cost; start or continue);
* ``cifarlab-mf-gittins``: the same rule scoring a move short of the target by the Gittins
  index of the staged run, which prices the option to stop after any rung
  (:mod:`cifarlab.tune.gittins`; ``FreezeThaw(option=True)``);
* ``cifarlab-mf-decay``: the same rule on the product kernel with freeze-thaw's budget kernel
  (:func:`cifarlab.tune.curves.fit_decay_curves`), to choose the kernel by measurement;
* ``cifarlab-gp``: cifarlab's GP sampler, every trial at the target budget;
* ``tpe-hyperband`` (BOHB-like), ``random-asha``, ``random-hyperband``: Optuna's samplers with
  its pruners, reporting at every rung.

The score after a compute ``c`` is the regret (at the target) of the best configuration that
reached the target budget within ``c``: every method's answer is evaluated there. Results are kept
per (problem, method, seed) in ``--results`` as they finish, so the run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, publish
from bo_functions import _H6_A, _H6_P, _H_ALPHA

RUNGS = (1 / 9, 1 / 3, 1.0)
STEPS = 9  # the pruners' resource units: rungs at 1, 3, 9
MAX_FREE = 50  # moves in a row that cost nothing (repeats of known rows) before a run ends
METHODS = ("cifarlab-mf", "cifarlab-mf-gittins", "cifarlab-mf-decay", "cifarlab-gp",
           "tpe-hyperband", "random-asha", "random-hyperband")


@dataclass(frozen=True)
class MFProblem:
    name: str
    dims: int
    lows: np.ndarray
    highs: np.ndarray
    fmin: float  # at the target budget
    budget: float  # total compute per run, in target-budget units

    def value(self, u: np.ndarray, b: float) -> float:
        x = self.lows + np.asarray(u, dtype=float) * (self.highs - self.lows)
        return _FUNCTIONS[self.name](x, b)


def _aug_branin(x: np.ndarray, s: float) -> float:
    x1, x2 = x
    t1 = x2 - (5.1 / (4 * math.pi**2) - 0.1 * (1 - s)) * x1**2 + 5 / math.pi * x1 - 6
    return float(t1**2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10)


def _aug_hartmann6(x: np.ndarray, s: float) -> float:
    e = np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))
    alpha = _H_ALPHA.copy()
    alpha[0] -= 0.1 * (1 - s)
    return float(-np.sum(alpha * e))


_FUNCTIONS = {"mf-branin": _aug_branin, "mf-hartmann6": _aug_hartmann6}
PROBLEMS = {
    "mf-branin": MFProblem("mf-branin", 2, np.array([-5.0, 0.0]), np.array([10.0, 15.0]),
                           0.397887, 20.0),
    "mf-hartmann6": MFProblem("mf-hartmann6", 6, np.zeros(6), np.ones(6), -3.32237, 40.0),
}


CURVES = {"cifar-curves": Path(__file__).resolve().parent / "data/cifar-curves-cpu.json",
          "cifar-curves-b": Path(__file__).resolve().parent / "data/cifar-curves-cpu-b.json"}


class TabularProblem:
    """Recorded learning curves (``bench/record_curves.py``) as a problem: the loss of a
    configuration after budget ``b`` is that of the nearest recorded configuration, in the
    space's normalized coordinates, at the nearest recorded ninth of the budget (a 1-nearest-
    neighbour surrogate, as Syne Tune's blackbox repository uses for LCBench). A diverged run
    counts as the worst finite loss recorded at that budget."""

    def __init__(self, path: Path, name: str = "cifar-curves", budget: float = 30.0) -> None:
        from optuna._gp.search_space import SearchSpace as GPSpace

        from cifarlab.models import default_config
        from cifarlab.tune.mfstudy import distributions, progress_of
        from cifarlab.tune.space import SearchSpace

        table = json.loads(path.read_text())
        space = SearchSpace.from_dict(table["space"])
        gp = GPSpace(distributions(space))
        params = [c["params"] for c in table["configs"]]
        self.x = gp.get_normalized_params([None] * len(params), params)  # type: ignore[list-item]
        loss = np.array([[math.nan if v is None else v for v in c["val_loss"]]
                         for c in table["configs"]], dtype=float)
        worst = np.nanmax(loss, axis=0)
        self.loss = np.where(np.isnan(loss), worst, loss)
        self.name, self.dims, self.budget = name, self.x.shape[1], budget
        self.fmin = float(self.loss[:, -1].min())
        self.points = self.loss.shape[1]
        self.target = table["target"]
        self.seed = int(table.get("seed", 0))  # record_curves.py's --seed: which configurations
        # budget as the recorded runs' schedule progress, as a study measures it
        self.progress = progress_of(space, default_config(space.fidelity.model))

    def row(self, u: np.ndarray) -> int:
        """The recorded configuration nearest to ``u``."""
        return int(np.argmin(np.sum((self.x - np.asarray(u, dtype=float)) ** 2, axis=1)))

    def value(self, u: np.ndarray, b: float) -> float:
        i = self.row(u)
        k = min(self.points, max(1, round(b * self.points))) - 1
        return float(self.loss[i, k])


def get_problem(name: str) -> MFProblem | TabularProblem:
    if name in CURVES:
        if not CURVES[name].exists():
            raise SystemExit(f"{CURVES[name]} does not exist: record it with "
                             "bench/record_curves.py")
        return TabularProblem(CURVES[name], name)
    return PROBLEMS[name]


class Replay:
    """Bookkeeping shared by all methods: the compute spent and the answer's regret.

    On a recorded table a proposal is its nearest recorded configuration (a *row*), and many
    proposals fall on the same row. Training a row again to a budget it already had in this
    run is answered from the run's memory at no cost: a repeat of a known result, as a tool
    that recognises repeats answers it (cifarlab's GP sampler does, and Optuna's FAQ asks users
    to), and as tabular benchmarks are replayed (a method chooses among the table's rows). Only
    the training beyond what the row already had is charged. Without this rule the recorded
    tables charged every method for re-training rows it had trained: 17-29% of random search
    + ASHA's compute, 50-62% of TPE + Hyperband's, 47-63% of cifarlab's GP sampler's and 38-54%
    of the freeze-thaw rule's (6, 6, 4 and 2 seeds of ``cifar-curves``, measured 2026-11-28). A
    run ends when its budget is spent, or after ``MAX_FREE`` moves in a row that cost nothing
    (a sampler that only proposes rows it has: it has stopped exploring)."""

    def __init__(self, problem: MFProblem | TabularProblem) -> None:
        self.p = problem
        self.spent = 0.0
        self.best = math.inf  # best loss of a configuration that reached the target
        self.trace: list[tuple[float, float]] = []  # (compute, regret) at each change
        self.had: dict[int, float] = {}  # a recorded row -> the budget trained on it so far
        self.free = 0  # moves in a row that cost nothing

    def train(self, u: np.ndarray, a: float, b: float) -> float:
        """Train from budget ``a`` to ``b``; the loss at ``b``."""
        cost = b - a
        if isinstance(self.p, TabularProblem):
            i = self.p.row(u)
            had = self.had.get(i, 0.0)
            cost = max(0.0, b - max(a, had))
            self.had[i] = max(had, b)
        self.spent += cost
        self.free = self.free + 1 if cost <= 1e-12 else 0
        y = self.p.value(u, b)
        if b >= 1.0 - 1e-9 and y < self.best:
            self.best = y
            self.trace.append((round(self.spent, 6), y - self.p.fmin))
        return y

    @property
    def out(self) -> bool:
        return self.spent >= self.p.budget - 1e-9 or self.free >= MAX_FREE


def run_freezethaw(problem: MFProblem | TabularProblem, seed: int, kernel: str = "joint",
                   option: bool = False) -> Replay:
    from cifarlab.tune.freezethaw import DONE, PAUSED, CostModel, Curve, FreezeThaw

    r = Replay(problem)
    policy = FreezeThaw(RUNGS, lambda rng, n: rng.random_sample((n, problem.dims)),
                        n_startup=max(5, problem.dims + 2), seed=seed, kernel=kernel,
                        progress=getattr(problem, "progress", None), option=option)
    curves: list[Curve] = []
    cost = CostModel(rate=1.0)  # the replay's seconds are budget units: no overhead to learn
    while not r.out:
        d = policy.decide(curves, cost)
        if d is None:  # (a finite space, all of it tried: not these problems)
            break
        if d.index is None:
            curves.append(Curve(x=d.x))
            c = curves[-1]
        else:
            c = curves[d.index]
        y = r.train(c.x, c.budget, d.to_budget)
        c.budgets.append(d.to_budget)
        c.values.append(y)
        c.state = DONE if d.to_budget >= 1.0 - 1e-9 else PAUSED
    return r


def run_optuna(problem: MFProblem | TabularProblem, method: str, seed: int) -> Replay:
    import optuna

    from cifarlab.tune.samplers import make_pruner, make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler_name, _, pruner_name = method.partition("-")
    if sampler_name == "cifarlab":
        sampler, pruner, steps = make_sampler("gp", seed, 10), optuna.pruners.NopPruner(), [STEPS]
    else:
        sampler = make_sampler(sampler_name, seed, 10)
        pruner = make_pruner(pruner_name, STEPS)
        steps = [round(b * STEPS) for b in RUNGS]
    study = optuna.create_study(sampler=sampler, pruner=pruner)
    r = Replay(problem)
    while not r.out:
        t = study.ask()
        u = np.array([t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(problem.dims)])
        done, prev, y = True, 0, math.nan
        for k in steps:
            y = r.train(u, prev / STEPS, k / STEPS)
            prev = k
            if k == STEPS:
                break
            t.report(y, k)
            if t.should_prune() or r.out:
                done = False
                break
        if done:
            study.tell(t, y)
        else:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
    return r


def run_one(args: tuple[str, str, int]) -> tuple[str, dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    pname, method, seed = args
    t0 = time.perf_counter()
    p = get_problem(pname)
    if method.startswith("cifarlab-mf"):
        r = run_freezethaw(p, seed, "decay" if method.endswith("-decay") else "joint",
                           option=method.endswith("-gittins"))
    else:
        r = run_optuna(p, method, seed)
    return f"{pname}/{method}/{seed}", {"trace": r.trace, "spent": r.spent,
                                        "seconds": round(time.perf_counter() - t0, 2)}


def regret_at(trace: list[list[float]], c: float) -> float:
    reg = [g for spent, g in trace if spent <= c + 1e-9]
    return min(reg) if reg else math.inf


def _seeds_run(results: dict, pname: str, method: str) -> int:
    n = 0
    while f"{pname}/{method}/{n}" in results:
        n += 1
    return n


def report(results: dict, problems: list[str], methods: list[str], seeds: int) -> None:
    lines = [
        "## Multi-fidelity samplers, replayed (`bench/mf_replay.py`)",
        "",
        f"Machine: {machine()}. Rungs {', '.join(f'{b:.3g}' for b in RUNGS)} of the target "
        f"budget; at least {seeds} seeds (each problem's count in its heading: every method's "
        "runs of seeds 0 to n-1 that all the methods have); regret at the target of the best "
        "configuration that reached it. Median over seeds at half and all of the compute "
        "(target-budget units), and the compute at which the median regret first reaches the "
        "best peer's final median.",
        "",
    ]
    for pname in problems:
        p = get_problem(pname)
        grid = np.linspace(0, p.budget, 201)
        med: dict[str, np.ndarray] = {}
        secs: dict[str, float] = {}
        final: dict[str, np.ndarray] = {}  # each seed's regret at the end
        counts = [n for n in (_seeds_run(results, pname, m) for m in methods) if n >= seeds]
        n_seeds = min(counts) if counts else seeds
        for m in methods:
            runs = [results.get(f"{pname}/{m}/{s}") for s in range(n_seeds)]
            if any(x is None for x in runs):
                continue
            med[m] = np.median([[regret_at(x["trace"], c) for c in grid] for x in runs], axis=0)
            final[m] = np.array([regret_at(x["trace"], p.budget) for x in runs])
            secs[m] = float(np.median([x["seconds"] for x in runs]))
        if not med:
            continue
        peers = [m for m in med if not m.startswith("cifarlab-mf")]
        best_peer = min(peers, key=lambda m: med[m][-1]) if peers else None
        what = (f"; {len(p.x)} recorded configurations (table seed {p.seed}), each trained "
                f"to airnet width {p.target['width']:g}, {p.target['epochs']:g} epochs on "
                f"{p.target['train_fraction']:g} of the training split, validation on "
                f"{p.target['val_size']} images" if isinstance(p, TabularProblem) else "")
        lines += [f"**{pname}** (budget {p.budget:g}, {n_seeds} seeds{what})", "",
                  "| method | regret at half | regret at end | reaches best peer's final at | "
                  "mean regret at end | seeds ending on the best | s per run |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m, curve in med.items():
            reach = "–"
            if best_peer is not None:
                hit = np.nonzero(curve <= med[best_peer][-1])[0]
                reach = f"{grid[hit[0]]:.1f}" if len(hit) else "never"
            lines.append(f"| {m} | {curve[100]:.4g} | {curve[-1]:.4g} | {reach} | "
                         f"{np.mean(final[m]):.4g} | {int(np.sum(final[m] <= 1e-12))} | "
                         f"{secs[m]:.1f} |")
        lines.append("")
    publish("mf-replay", lines)


def timing(n_points: int = 200, repeats: int = 10) -> None:
    """Seconds per decision with ``n_points`` observed points (every trial's reported epochs
    together): AugmentedHartmann6 curves at 9 budgets each, some paused, as in a study."""
    import torch

    from cifarlab.tune.freezethaw import DONE, PAUSED, CostModel, Curve, FreezeThaw

    torch.set_num_threads(2)
    p = PROBLEMS["mf-hartmann6"]
    rng = np.random.RandomState(0)
    budgets = [k / 9 for k in range(1, 10)]
    curves, n = [], 0
    while n < n_points:
        x = rng.random_sample(p.dims)
        k = int(rng.choice([1, 3, 9]))  # stopped at a rung, every epoch reported before it
        curves.append(Curve(x=x, budgets=budgets[:k], values=[p.value(x, b) for b in budgets[:k]],
                            state=DONE if k == 9 else PAUSED, reached=budgets[k - 1]))
        n += k
    # a worker imports what a decision needs once (scipy.stats for the warping: 0.45 s here):
    # a throw-away policy on a few curves pays it, so the first timed decision is a fit from
    # scratch, not an import
    FreezeThaw(RUNGS, lambda r, m: r.random_sample((m, p.dims)), seed=1).decide(
        curves[:12], CostModel())
    policy = FreezeThaw(RUNGS, lambda r, m: r.random_sample((m, p.dims)), seed=0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.decide(curves, CostModel())
        times.append(time.perf_counter() - t0)
    lines = ["## Freeze-thaw decision time (`bench/mf_replay.py timing`)", "",
             f"Machine: {machine()}. {sum(len(c.budgets) for c in curves)} observed points "
             f"({len(curves)} configurations, 6 parameters): median {np.median(times):.3f} s, "
             f"max {max(times):.3f} s per decision over {repeats} decisions (the first fits "
             "the GP from scratch, the others start from the previous fit; the process's "
             "one-time imports are paid before the first); target at most "
             "0.5 s at 200 observed epochs."]
    publish("mf-timing", lines)


def main() -> None:
    if sys.argv[1:2] == ["timing"]:
        timing()
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS),
                    choices=[*PROBLEMS, *CURVES])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--results", type=Path, default=Path("bench-out/mf-replay.json"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--curves", type=Path, default=None,
                    help="the recorded curves of the cifar-curves problem "
                         f"[default: {CURVES['cifar-curves']}]")
    a = ap.parse_args()
    if a.curves is not None:
        CURVES["cifar-curves"] = a.curves  # (the worker processes are forked: they see it)
    results = json.loads(a.results.read_text()) if a.results.exists() else {}
    todo = [(p, m, s) for p in a.problems for m in a.methods for s in range(a.seeds)
            if f"{p}/{m}/{s}" not in results]
    if not a.report_only and todo:
        from cifarlab.files import atomic_write_text

        a.results.parent.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(a.jobs) as pool:
            for key, row in pool.map(run_one, todo):
                results[key] = row
                atomic_write_text(a.results, json.dumps(results))
                print(key, f"{row['seconds']:.1f}s",
                      f"final regret {row['trace'][-1][1] if row['trace'] else math.inf:.4g}",
                      flush=True)
    report(results, a.problems, a.methods, a.seeds)


if __name__ == "__main__":
    main()
