"""Peer optimizers outside Optuna, for `bench/bo_suite.py`: HEBO and scikit-optimize's GP.

    bench-out/peers-venv/bin/python bench/bo_peers.py PROBLEM PEER SEED

Runs in its own virtual environment (``python bench/bo_suite.py --setup-peers`` makes it: HEBO
pins numpy < 1.25 and scipy 1.12, which cifarlab's environment does not), imports only the
problems module, and prints one JSON line: the true regret of the peer's recommendation (its best
observation), the mean seconds per suggestion, and how many points failed. A failed point is
reported to the peer as the worst value observed so far (neither library has a notion of a
failed evaluation; this is the usual workaround).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bo_functions import PROBLEMS, Problem


def _loop(problem: Problem, seed: int, ask, tell) -> dict[str, Any]:
    """Ask, evaluate (noise and failures as the problem says), tell; ``ask`` returns (the point
    as the peer gives it, the point by parameter name), ``tell`` takes the first and a value.
    The seconds count both calls (skopt fits its GP in tell, HEBO in suggest)."""
    rng = np.random.default_rng(seed + 1000)  # the same noise draws as bo_suite's samplers
    seconds, ys, failed, best, best_x = 0.0, [], 0, np.inf, None
    for _ in range(problem.budget):
        t0 = time.perf_counter()
        raw, x = ask()
        seconds += time.perf_counter() - t0
        y = problem.observe(x, rng)
        if y is None:
            failed += 1
        else:
            ys.append(y)
            if y < best:
                best, best_x = y, x
        t0 = time.perf_counter()
        tell(raw, y if y is not None else (max(ys) if ys else 0.0))
        seconds += time.perf_counter() - t0
    return {"regret": problem.value(best_x) - problem.fmin if best_x else float("nan"),
            "seconds": seconds / problem.budget, "failed": failed}


def run_hebo(problem: Problem, seed: int) -> dict[str, Any]:
    from hebo.design_space.design_space import DesignSpace
    from hebo.optimizers.hebo import HEBO

    spec = []
    for p in problem.params:
        if p[1] == "float":
            spec.append({"name": p[0], "type": "num", "lb": p[2], "ub": p[3]})
        elif p[1] == "int":
            spec.append({"name": p[0], "type": "int", "lb": p[2], "ub": p[3]})
        else:
            spec.append({"name": p[0], "type": "cat", "categories": [str(c) for c in p[2]]})
    cats = {p[0]: {str(c): c for c in p[2]} for p in problem.params if p[1] == "cat"}
    opt = HEBO(DesignSpace().parse(spec), rand_sample=10, scramble_seed=seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)

    def ask():
        rec = opt.suggest(n_suggestions=1)
        row = rec.iloc[0].to_dict()
        return rec, {k: cats[k][v] if k in cats else (v if isinstance(v, str) else
                                                      int(v) if isinstance(v, np.integer)
                                                      else float(v))
                     for k, v in row.items()}

    return _loop(problem, seed, ask, lambda rec, y: opt.observe(rec, np.array([[y]])))


def run_skopt(problem: Problem, seed: int) -> dict[str, Any]:
    from skopt import Optimizer
    from skopt.space import Categorical, Integer, Real

    dims = []
    for p in problem.params:
        if p[1] == "float":
            dims.append(Real(p[2], p[3], name=p[0]))
        elif p[1] == "int":
            dims.append(Integer(p[2], p[3], name=p[0]))
        else:
            dims.append(Categorical(list(p[2]), name=p[0]))
    opt = Optimizer(dims, base_estimator="GP", n_initial_points=10, random_state=seed)

    def ask():
        point = opt.ask()
        return point, {p[0]: v for p, v in zip(problem.params, point, strict=True)}

    return _loop(problem, seed, ask, lambda point, y: opt.tell(point, float(y)))


def main() -> None:
    warnings.filterwarnings("ignore")
    name, peer, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run = {"hebo": run_hebo, "skopt": run_skopt}[peer]
    print(json.dumps(run(PROBLEMS[name], seed)))


if __name__ == "__main__":
    main()
