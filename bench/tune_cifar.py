"""Tuning on real CIFAR-10 at a CPU budget: GP-BO against TPE and random search.

    python bench/tune_cifar.py [--trials 15] [--seeds 0 1 2] [--space examples/demo-space.yaml]
                               [--retrain-epochs 1] [--work bench-out/tune-cifar]

For each sampler and seed: a study of ``--trials`` trials on the space file's airnet space at
its low fidelity (1 epoch on a fifth of the training split for the demo's space; no pruning,
so every sampler gets exactly the same budget), then the best configuration retrained on train +
validation for ``--retrain-epochs`` epochs and evaluated once on test. Results are kept in
``--work``/results.json as they finish, so an interrupted run resumes. Writes its table into
docs/BENCHMARKS.md. Data: $CIFARLAB_DATA (or --data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section

SAMPLERS = ("gp", "tpe", "random")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--space", type=Path,
                   default=Path(__file__).resolve().parent.parent / "examples/demo-space.yaml")
    p.add_argument("--retrain-epochs", type=float, default=1.0)
    p.add_argument("--data", default=None)
    p.add_argument("--work", type=Path, default=Path("bench-out/tune-cifar"))
    a = p.parse_args()

    from cifarlab.config import DataConfig
    from cifarlab.data import load_data
    from cifarlab.trainer import train
    from cifarlab.tune import TuneSettings, best_config, load_space, run_study

    a.work.mkdir(parents=True, exist_ok=True)
    results_path = a.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    space = load_space(a.space)
    fid = space.fidelity
    data_cfg = DataConfig(source=a.data or os.environ.get("CIFARLAB_DATA"))
    full = None
    t_all = time.perf_counter()
    for seed in a.seeds:
        for sampler in SAMPLERS:
            key = f"{sampler}-{seed}"
            if key in results:
                continue
            study_dir = a.work / key
            t0 = time.perf_counter()
            settings = TuneSettings(study_dir=study_dir, n_trials=a.trials, sampler=sampler,
                                    pruner="none", seed=seed, data=data_cfg, quiet=True)
            study, _ = run_study(settings, space)
            tune_seconds = time.perf_counter() - t0
            cfg, best = best_config(study_dir)
            cfg.data = DataConfig(source=data_cfg.source, val_size=0)
            cfg.optim.epochs = a.retrain_epochs
            cfg.tta = 2
            if full is None:
                full = load_data(cfg.data)
            t1 = time.perf_counter()
            result = train(cfg, data=full, progress=False)
            results[key] = {
                "sampler": sampler, "seed": seed, "best_val_loss": best.value,
                "best_val_acc": best.user_attrs.get("val_acc"), "best_trial": best.number,
                "best_params": best.params, "tune_seconds": round(tune_seconds, 1),
                "test_acc": result.test_acc, "test_loss": result.test_loss,
                "retrain_seconds": round(time.perf_counter() - t1, 1),
                "n_complete": sum(t.state.name == "COMPLETE" for t in study.trials),
            }
            tmp = results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, results_path)
            r = results[key]
            print(f"{key:<10} best val_loss {r['best_val_loss']:.4f} (trial {r['best_trial']}), "
                  f"test acc {r['test_acc']:.4f}; tune {tune_seconds:.0f} s, retrain "
                  f"{r['retrain_seconds']:.0f} s", flush=True)

    rows = []
    means = {}
    for sampler in SAMPLERS:
        rs = [results[f"{sampler}-{s}"] for s in a.seeds if f"{sampler}-{s}" in results]
        if not rs:
            continue
        v = np.array([r["best_val_loss"] for r in rs])
        acc = np.array([r["test_acc"] for r in rs])
        means[sampler] = v.mean()
        rows.append(f"| {sampler} | {v.mean():.4f} ± {v.std():.4f} | "
                    + ", ".join(f"{x:.4f}" for x in v) + f" | {acc.mean() * 100:.2f}% | "
                    + ", ".join(f"{x * 100:.2f}" for x in acc) + " | "
                    f"{np.mean([r['tune_seconds'] for r in rs]) / 60:.1f} |")
    verdict = ("met" if means.get("gp", 1e9) < means.get("random", -1e9) else "MISSED")
    body = "\n".join([
        "## Tuning real CIFAR-10 (`bench/tune_cifar.py`)",
        "",
        f"Machine: {machine()}. Data: the shared JPEG copy of CIFAR-10. Space "
        f"`{a.space.name}` ({len(space.params)} parameters of {fid.model}), {a.trials} trials "
        f"per study at {fid.epochs:g} epoch(s) on {fid.train_fraction:g} of the training "
        "split, validation loss on 5,000 held-out training "
        f"images, no pruning (equal budgets), seeds {a.seeds}. The best configuration of each "
        f"study was retrained on all 50,000 training images for {a.retrain_epochs:g} epochs "
        "and evaluated once on the 10,000 test images (TTA 2). Total wall time "
        f"{(time.perf_counter() - t_all) / 60:.0f} min for the runs not already in results.json.",
        "",
        "| sampler | best val loss, mean ± std | per seed | retrained test acc, mean | "
        "per seed | min per study |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target: GP-BO beats random search on the mean best validation loss over seeds: "
        f"{verdict} (gp {means.get('gp', float('nan')):.4f} vs random "
        f"{means.get('random', float('nan')):.4f}).",
    ])
    print(body)
    write_section("tune-cifar", body)


if __name__ == "__main__":
    main()
