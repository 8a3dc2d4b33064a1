"""Do cheap trials transfer? Rank correlation of validation loss between each cheap fidelity and
the target budget, over the same configurations, on real CIFAR-10.

    python bench/fidelity.py [--configs 20] [--target-epochs 2]
                             [--fidelity 1:0.2 --fidelity 1:0.5] [--space examples/demo-space.yaml]

Configurations: the model's recipe (the baseline of every study) and ``--configs`` seeded random
draws from the space file. Each is trained with the study's own trial config (its fidelity
epochs on that fraction of the training split, the same 5,000 validation images, seed 0) at
every fidelity ``EPOCHS:FRACTION`` and at the target (``--target-epochs`` on the whole split),
and its validation loss recorded. Spearman's rho of each fidelity against the target says which
fidelity ranks configurations the way the target does; so does the recall of the target's top 3
among each fidelity's top 5. Every finished training is saved to ``--results`` at once, so the
benchmark resumes across sessions. Data: the original pixels (``--data``, else
``$CIFARLAB_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import optuna
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from cifarlab.config import DataConfig
from cifarlab.data import load_data
from cifarlab.files import atomic_write_text
from cifarlab.models import default_config
from cifarlab.trainer import train
from cifarlab.tune import load_space

LOSSLESS = Path(__file__).resolve().parents[2] / "shared/datasets/cifar-10-lossless-python.tar.gz"
# every training of the run on the 2-core EPYC (2026-11-26), committed so a rerun resumes
COMMITTED = Path(__file__).resolve().parent / "results" / "fidelity-cpu.json"


def configurations(space_file: Path, n: int) -> list[dict]:
    """The baseline ({}) and ``n`` seeded random parameter sets of the space."""
    space = load_space(space_file)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=12345))
    out: list[dict] = [{}]
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial)
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", type=int, default=20)
    p.add_argument("--target-epochs", type=float, default=2.0)  # make demo's budget
    p.add_argument("--fidelity", action="append", default=None,
                   help="EPOCHS:FRACTION, repeatable [default: 1:0.2 and 1:0.5]")
    p.add_argument("--space", type=Path,
                   default=Path(__file__).resolve().parent.parent / "examples/demo-space.yaml")
    p.add_argument("--data", default=os.environ.get("CIFARLAB_DATA") or str(LOSSLESS))
    p.add_argument("--results", type=Path, default=Path("bench-out/fidelity.json"))
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fids = [(float(e), float(f)) for e, f in
            (x.split(":") for x in (a.fidelity or ["1:0.2", "1:0.5"]))]
    levels = [*fids, (a.target_epochs, 1.0)]
    start = a.results if a.results.exists() else COMMITTED  # a fresh clone resumes from it
    results = json.loads(start.read_text()) if start.exists() else {}
    space = load_space(a.space)
    configs = configurations(a.space, a.configs)
    recipe = default_config(space.fidelity.model)
    datas: dict[float, object] = {}
    for i, params in enumerate(configs):
        for epochs, fraction in levels:
            key = f"{i}/{epochs:g}:{fraction:g}"
            if key in results:
                continue
            if fraction not in datas:
                datas[fraction] = load_data(DataConfig(source=a.data, train_fraction=fraction))
            # the baseline is the recipe untouched; a drawn configuration is a study trial's
            cfg = (recipe if not params else space.config_for(params)).with_values(
                {"optim.epochs": epochs, "data.train_fraction": fraction, "tta": 0, "seed": 0,
                 "device": "cpu"})
            t0 = time.perf_counter()
            r = train(cfg, [], data=datas[fraction], evaluate_test=False, progress=False)
            results[key] = {"config": i, "params": params, "epochs": epochs,
                            "fraction": fraction, "val_loss": r.val_loss, "val_acc": r.val_acc,
                            "val_cal_loss": r.val_cal_loss,
                            "seconds": round(time.perf_counter() - t0, 1), "machine": machine()}
            print(key, json.dumps(results[key]), flush=True)
            a.results.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(a.results, json.dumps(results, indent=1))
    report(results, configs, fids, (a.target_epochs, 1.0), a)


def report(results: dict, configs: list[dict], fids: list[tuple[float, float]],
           target: tuple[float, float], a: argparse.Namespace) -> None:
    def column(level: tuple[float, float]) -> np.ndarray:
        return np.array([results[f"{i}/{level[0]:g}:{level[1]:g}"]["val_loss"]
                         for i in range(len(configs))], dtype=float)

    def secs(level: tuple[float, float]) -> float:
        return float(np.mean([results[f"{i}/{level[0]:g}:{level[1]:g}"]["seconds"]
                              for i in range(len(configs))]))

    y = column(target)
    finite = np.isfinite(y)
    top3 = set(np.argsort(np.where(finite, y, np.inf))[:3])
    rows = []
    for level in fids:
        x = column(level)
        ok = finite & np.isfinite(x)
        rho = float(spearmanr(x[ok], y[ok]).statistic)
        top5 = set(np.argsort(np.where(np.isfinite(x), x, np.inf))[:5])
        rows.append(f"| {level[0]:g} epoch(s) on {level[1]:.0%} of the split | {rho:+.2f} | "
                    f"{len(top3 & top5)}/3 | {secs(level):.0f} s |")
    base_rank = int((y < y[0]).sum()) + 1
    lines = [
        "## Do cheap trials transfer? (`bench/fidelity.py`)",
        "",
        f"Machine: {machine()}. Data: the original pixels. Space `{a.space.name}`: the recipe "
        f"and {len(configs) - 1} seeded random configurations, each trained at every fidelity "
        f"and at the target ({target[0]:g} epochs on the whole 45,000-image training split), "
        "validation loss on the same 5,000 held-out training images, seed 0.",
        "",
        "| fidelity | Spearman rho vs target | target's top 3 in its top 5 | mean s per trial |",
        "|---|---:|---:|---:|",
        *rows,
        f"| target: {target[0]:g} epochs on 100% | 1 | 3/3 | {secs(target):.0f} s |",
        "",
        f"The recipe (baseline) ranks {base_rank} of {len(configs)} at the target budget "
        f"(validation loss {y[0]:.4f}; best drawn configuration {np.nanmin(y[1:]):.4f}, median "
        f"{np.nanmedian(y[1:]):.4f}).",
    ]
    write_section("fidelity", "\n".join(lines))


if __name__ == "__main__":
    main()
